"""The ``vlm-mig`` command line: one subcommand per job, each importing its stage lazily."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from vlm_mig.config import ConfigError
from vlm_mig.data.arithmetic import NUM_STEPS
from vlm_mig.data.clevr import CONDITIONS, DEFAULT_CONDITION, DEFAULT_MIX, IMAGE_SIZE, NUM_OBJECTS, QUESTION_MIXES
from vlm_mig.data.schema import DataError
from vlm_mig.mig import ANSWER_SCORES, L0_CONTEXTS, RECORDS
from vlm_mig.model_options import ARCHES, WarmupConfig
from vlm_mig.models import check_model_path
from vlm_mig.outputs import check_output
from vlm_mig.score import ScoreConfig as ScoreDefaults

Handler = Callable[[argparse.Namespace], int]


def _build_tiny(args: argparse.Namespace) -> int:
    from vlm_mig.models import build_tiny, tiny_model_dir

    steps = WarmupConfig.steps if args.warmup_steps is None and args.arch != "qwen2" else args.warmup_steps or 0
    if steps and args.arch == "qwen2":
        raise ConfigError("--warmup-steps: arch qwen2 has no vision tower to warm up")
    if args.out is None:  # the cached copy that `model.name_or_path: tiny` and the demo use
        out = tiny_model_dir(args.arch, steps, seed=args.seed, progress=True)
    else:
        check_output(args.out, "--out", folder=True)
        out = build_tiny(args.out, arch=args.arch, seed=args.seed, progress=True,
                         warmup=WarmupConfig.for_steps(steps) if steps else None)
    how = f"vision tower warmed up for {steps} steps" if steps else "random weights"
    print(f"tiny {args.arch} model (seed {args.seed}, {how}): {out}")
    return 0


def _data_clevr(args: argparse.Namespace) -> int:
    from vlm_mig.data.synthetic import write_clevr

    check_output(args.out, "--out", folder=True)
    samples = write_clevr(
        args.out, n=args.n, condition=args.condition, seed=args.seed, image_size=args.image_size,
        num_objects=(args.min_objects, args.max_objects), questions_per_scene=args.questions_per_scene,
        question_mix=args.mix,
    )
    print(f"wrote {len(samples)} CLEVR-like samples (condition {args.condition}, seed {args.seed}) to {args.out}")
    return 0


def _data_arithmetic(args: argparse.Namespace) -> int:
    from vlm_mig.data.synthetic import write_arithmetic

    check_output(args.out, "--out", folder=False)
    samples = write_arithmetic(
        args.out, n=args.n, seed=args.seed, num_steps=(args.min_steps, args.max_steps), error_rate=args.error_rate,
        propagate=not args.no_propagate,
    )
    print(f"wrote {len(samples)} arithmetic problems (seed {args.seed}) to {args.out}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from vlm_mig.score import ScoreConfig, score_file

    try:
        cfg = ScoreConfig(probe=args.probe, max_steps=args.max_steps, min_step_chars=args.min_step_chars,
                          batch_size=args.batch_size, visual_evidence=args.visual_evidence,
                          l0_context=args.l0_context, answer_score=args.answer_score, watermark=not args.no_watermark,
                          min_gain=args.min_gain, records=args.records, max_tokens=args.max_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    check_output(args.out, "--out", folder=False)
    check_model_path(args.model, "--model")
    n = score_file(args.model, args.data, args.out, explain=args.explain, cfg=cfg, task=args.task)
    print(f"scored {n} rows -> {args.out}")
    return 0


def _train(args: argparse.Namespace, mode: str) -> int:
    from vlm_mig.config import load_config
    from vlm_mig.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, mode=mode, resume=args.resume_from or args.resume, overwrite=args.overwrite)
    metrics = trainer.train()
    if trainer.is_main:
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("reward/", "val/", "loss"))}
        print(f"{mode} finished at step {trainer.step}: {shown}; outputs in {cfg.trainer.output_dir}")
    return 0


def _add_train_parser(sub, name: str, mode: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", help="YAML recipe (see configs/)")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in trainer.output_dir")
    p.add_argument("--resume-from", metavar="DIR", help="resume from this checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="trainer.output_dir holds an earlier run: remove its logs and checkpoints and start over")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.max_steps=20")
    p.set_defaults(handler=lambda a: _train(a, mode))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-mig", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tiny", help="write the tiny offline default model (HF folder, safetensors)")
    p.add_argument("--out", help="output folder (default: build once into the cache, $VLM_MIG_CACHE or "
                                 "~/.cache/vlm-mig, where `model.name_or_path: tiny` finds it)")
    p.add_argument("--arch", default=ARCHES[0], choices=ARCHES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"vision warm-up steps on synthetic scenes (default: {WarmupConfig.steps} for VLMs, a few "
                        "CPU minutes; 0: random vision tower)")
    p.set_defaults(handler=_build_tiny)

    data = sub.add_parser("data", help="generate synthetic data offline").add_subparsers(dest="kind", required=True)
    p = data.add_parser("clevr", help="CLEVR-like counting scenes (Super-CLEVR layout + data.jsonl)")
    p.add_argument("--n", type=int, required=True, help="number of scenes")
    p.add_argument("--out", help="output folder (default: build once into the cache, $VLM_MIG_CACHE or "
                                 "~/.cache/vlm-mig, where `model.name_or_path: tiny` finds it)")
    p.add_argument("--condition", default=DEFAULT_CONDITION, choices=list(CONDITIONS),
                   help=f"CLEVR-CoGenT colour/shape split (all: no colour rule; default {DEFAULT_CONDITION})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"image side in pixels (default {IMAGE_SIZE})")
    p.add_argument("--min-objects", type=int, default=NUM_OBJECTS[0])
    p.add_argument("--max-objects", type=int, default=NUM_OBJECTS[1])
    p.add_argument("--questions-per-scene", type=int, default=1)
    p.add_argument("--mix", default=DEFAULT_MIX, choices=list(QUESTION_MIXES),
                   help=f"question types: counting (count all / by attribute / compare) or multistep (also filter "
                        f"chains, add, subtract); default {DEFAULT_MIX}")
    p.set_defaults(handler=_data_clevr)
    p = data.add_parser("arithmetic", help="multi-step arithmetic word problems with gold steps (jsonl)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-steps", type=int, default=NUM_STEPS[0])
    p.add_argument("--max-steps", type=int, default=NUM_STEPS[1])
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of problems with an injected step error")
    p.add_argument("--no-propagate", action="store_true",
                   help="later steps return to the true value after an error")
    p.set_defaults(handler=_data_arithmetic)
    _add_train_parser(sub, "sft", "sft", "supervised warm start on gold step-by-step solutions")
    _add_train_parser(sub, "train", "rl",
                      "RL with MIG process reward + outcome reward (GRPO: loss.alpha=0 loss.gamma=0)")

    from vlm_mig.demo import add_demo_command
    from vlm_mig.evaluation import add_eval_command

    add_eval_command(sub)
    add_demo_command(sub)

    p = sub.add_parser("score", help="which of my reasoning steps carried information? (l_k, gains, R_proc)")
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--data", required=True, help="jsonl: question|messages, image|images, completion, answer")
    p.add_argument("--out", required=True, help="output jsonl (input rows plus steps, l, watermark, gains, ...)")
    p.add_argument("--explain", action="store_true", help="add the exact token ids of every naive sequence")
    p.add_argument("--task", default="text", help="task type of the rows (only used for validation)")
    p.add_argument("--probe", default=ScoreDefaults.probe)
    p.add_argument("--max-steps", type=int, default=ScoreDefaults.max_steps)
    p.add_argument("--min-step-chars", type=int, default=ScoreDefaults.min_step_chars)
    p.add_argument("--batch-size", type=int, default=ScoreDefaults.batch_size)
    p.add_argument("--visual-evidence", action="store_true", help="also score l_0 without the images")
    p.add_argument("--l0-context", default=ScoreDefaults.l0_context, choices=L0_CONTEXTS,
                   help="score l_0 right after <think> (empty_think) or after the neutral opener")
    p.add_argument("--answer-score", default=ScoreDefaults.answer_score, choices=ANSWER_SCORES,
                   help="answer token log-probs -> l_k: mean, sum (sequence log-prob), digits, or margin (against "
                        "the most likely other token)")
    p.add_argument("--no-watermark", action="store_true", help="gains are the raw l_k - l_{k-1} (ablation)")
    p.add_argument("--min-gain", type=float, default=ScoreDefaults.min_gain, help="gains below this (nats) count as 0")
    p.add_argument("--max-tokens", type=int, default=ScoreDefaults.max_tokens,
                   help="longest prompt + completion a row may have, in tokens (longer rows are an error)")
    p.add_argument("--records", default=ScoreDefaults.records, choices=RECORDS,
                   help="kept: a record earns only what the last step keeps (h capped at l_K); all: every record")
    p.set_defaults(handler=_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

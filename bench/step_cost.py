"""What one RL step costs, as ratios of alternated runs in one invocation (issue 21, item 6).

P2  MIG step / GRPO step (goal <= 1.05): the demo's SFT start and recipe (``<demo>/configs/{grpo,mig}-seed0.yaml``),
    two ``Trainer`` objects side by side; each pair runs ``rl_step()`` on MIG and on GRPO (the order alternating
    from pair to pair) at the same step index
    (same prompts, same rollout seeds). By default ``optim.lr=0``: the weights never move, so both sides sample the
    very same completions at every pair and differ only in MIG's work (``--keep-lr`` keeps the recipe's lr).
P3  our GRPO step / TRL ``GRPOTrainer``'s step (goal <= 0.80): random-init tiny Qwen2-VL, 2 prompts x G = 8,
    32 new tokens, beta (kl) 0.04, one optimisation pass per batch in 2 micro-batches of 8 (one optimizer step
    over 16 completions), the same lr, temperature 1, all weights trained. TRL drives the loop; a callback times
    each of its steps (``on_step_begin`` -> ``on_step_end``) and then runs and times our step on the same prompts.
UPD the update stage alone, MIG (scored in the update's forward) / GRPO, on one batch of the P2 MIG trainer (its
    rollouts at step 0, lr 0), alternated; with the seconds of each decoder call of one MIG and one GRPO update
    (the copies' own call without gradient shows as the short ones), and the MIG update with the copies kept
    in the pass with gradient (``--parts upd`` only; what the update cost before their call of their own).
GEN the ``hf`` rollout engine's generate (seeded, as the trainer calls it, and unseeded) against a bare
    ``model.generate`` on the same encoded batch (same model and workload as P3); TRL's generation time (its
    ``_generate``: prompt encoding + ``generate``) and ours (``time/generate``) come from the P3 runs.

Each ratio is the median of the per-pair ratios (pairs alternate A, B, A, B, ...; warm-up pairs are dropped);
medians of each side's seconds are reported beside it.

    python bench/step_cost.py --demo out/demo5 --pairs 5 [--threads 1] [--json bench/results/step_cost.json]
    python bench/step_cost.py --config-grpo g.yaml --config-mig m.yaml --parts p2   # any config pair

TRL is a bench-only extra (``pip install -e '.[bench]'``, or ``pip install --no-deps trl==1.16.0``); only P3
imports it, and the package never does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

PARTS = ("p2", "upd", "p3", "gen")
#: Overrides that make a run config a timing harness: no validation, no checkpoints, no loggers, no samples.
HARNESS = ["trainer.eval_steps=0", "trainer.save_steps=1000000", "trainer.max_steps=1000000", "trainer.report_to=[]",
           "trainer.progress=false", "trainer.sample_log_steps=0", "data.validation=null"]


def paired(a: list[float], b: list[float]) -> dict:
    """Medians of two alternated series and the median (and range) of their per-pair ratios a/b."""
    ratios = [x / y for x, y in zip(a, b)]
    return {"a_median_s": statistics.median(a), "b_median_s": statistics.median(b),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "pairs": len(ratios), "a_s": a, "b_s": b}


def median_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-phase medians of the ``time/...`` metrics of several steps (seconds)."""
    keys = sorted({k for r in rows for k in r if k.startswith("time/") and k != "time/tokens_per_s"})
    return {k.split("/", 1)[1]: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}


def make_trainer(config: str | Path | None, out: Path, overrides: list[str]):
    from vlm_mig.config import load_config
    from vlm_mig.trainer import Trainer

    cfg = load_config(config, [*HARNESS, f"trainer.output_dir={out}", *overrides])
    return Trainer(cfg, mode="rl", overwrite=True)


def timed_step(trainer, step: int) -> tuple[float, dict[str, float]]:
    trainer.step = step  # the same prompts and rollout seeds for both sides of a pair
    t0 = time.perf_counter()
    metrics = trainer.rl_step()
    return time.perf_counter() - t0, metrics


# --------------------------------------------------------------------------------------------------
# P2: MIG / GRPO on the demo's start


def run_p2(grpo_cfg: Path, mig_cfg: Path, tmp: Path, args) -> dict:
    common = [f"trainer.threads={args.threads}"] + ([] if args.keep_lr else ["optim.lr=0"])
    common += args.override or []
    sides = {"mig": make_trainer(mig_cfg, tmp / "p2-mig", common),
             "grpo": make_trainer(grpo_cfg, tmp / "p2-grpo", common)}
    wall: dict[str, list[float]] = {"mig": [], "grpo": []}
    rows: dict[str, list[dict]] = {"mig": [], "grpo": []}
    same = []
    for i in range(args.warmup + args.pairs):
        got, dts = {}, {}
        # A = MIG, B = GRPO; who goes first alternates, so neither side always finds the caches the other warmed
        for name in (("mig", "grpo") if i % 2 == 0 else ("grpo", "mig")):
            dts[name], got[name] = timed_step(sides[name], i)
            if i >= args.warmup:
                wall[name].append(dts[name])
                rows[name].append(got[name])
        same.append(got["mig"]["length/completion"] == got["grpo"]["length/completion"])
        print(f"  p2 pair {i}{' (warm-up)' if i < args.warmup else ''}: MIG {dts['mig']:.3f} s, "
              f"GRPO {dts['grpo']:.3f} s", flush=True)
    cfg = sides["mig"].cfg
    out = {"configs": {"grpo": str(grpo_cfg), "mig": str(mig_cfg)}, "start": cfg.model.name_or_path,
           "lr": cfg.optim.lr, "lr_note": "recipe lr (weights move)" if args.keep_lr else
           "optim.lr=0: weights fixed, both sides sample the same completions each pair",
           "prompts_per_step": cfg.trainer.prompts_per_step, "G": cfg.rollout.num_generations,
           "max_new_tokens": cfg.rollout.max_new_tokens, "micro_batch_size": cfg.trainer.micro_batch_size,
           "threads": args.threads, "warmup_pairs": args.warmup,
           "mig_over_grpo": paired(wall["mig"], wall["grpo"]),
           "phases": {k: median_phases(v) for k, v in rows.items()},
           "completion_length": {k: statistics.mean(r["length/completion"] for r in v) for k, v in rows.items()},
           "same_completion_lengths_every_pair": all(same)}
    for t in sides.values():
        t.log.close()
    return out


def run_upd(mig_cfg: Path, tmp: Path, args) -> dict:
    import dataclasses

    import torch

    import vlm_mig.forward as fwd
    from vlm_mig.rl import stages

    common = [f"trainer.threads={args.threads}", "optim.lr=0", *(args.override or [])]
    tr = make_trainer(mig_cfg, tmp / "upd-mig", common)
    cfg = tr.cfg
    samples, seeds = tr.batch_for(0, cfg.trainer.prompts_per_step)
    batch = stages.rollout(tr.engine, samples, seeds)
    stages.segment(batch, tr.tok, tr.step_cfg)
    stages.reward(batch, tr.reward_specs)
    stages.score(batch, tr.scorer)
    scoring = stages.step_scoring(batch, tr.scorer)
    grpo_loss = dataclasses.replace(cfg.loss, alpha=0.0, gamma=0.0)
    decoder = tr.adapter.decoder(tr.model)
    calls: list[tuple[list[int], bool, float]] = []
    forward = decoder.forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter()
        out = forward(*a, **kw)
        calls.append((list(kw["inputs_embeds"].shape[:2]), torch.is_grad_enabled(), time.perf_counter() - t0))
        return out

    class KeepNoStep:  # the trainer's passes and backward; the optimizer step only clears the gradient
        device = tr.device
        completion_logprobs = staticmethod(tr.completion_logprobs)
        backward = staticmethod(tr.backward)

        @staticmethod
        def optimizer_step():
            tr.optimizer.zero_grad(set_to_none=True)
            return 0.0

    def update(name: str) -> float:
        mb = cfg.trainer.micro_batch_size
        t0 = time.perf_counter()
        if name == "grpo":
            stages.advantages(batch, cfg.advantage, cfg.mig.min_spread, tr.acc)
            stages.update(batch, KeepNoStep, grpo_loss, micro_batch_size=mb, num_iterations=1, dist=tr.acc)
        else:
            stages.update(batch, KeepNoStep, cfg.loss, micro_batch_size=mb, num_iterations=1, dist=tr.acc,
                          in_update=stages.InUpdate(scoring, cfg.mig, cfg.advantage))
        return time.perf_counter() - t0

    names = ("mig", "grpo", "mig_one_call")
    wall: dict[str, list[float]] = {n: [] for n in names}
    split = fwd._caches_in_training
    decoder.forward = timed_forward
    try:
        for i in range(args.warmup + args.pairs):
            for name in names if i % 2 == 0 else names[::-1]:
                calls.clear()
                fwd._caches_in_training = (lambda d: False) if name == "mig_one_call" else split
                dt = update("grpo" if name == "grpo" else "mig")
                if i >= args.warmup:
                    wall[name].append(dt)
                if i == args.warmup + args.pairs - 1:
                    print(f"  upd {name}: decoder calls [rows, tokens], grad, s: "
                          + ", ".join(f"{c[0]} {c[1]} {c[2]:.4f}" for c in calls), flush=True)
                    wall[f"{name}_calls"] = [list(c) for c in calls]
    finally:
        decoder.forward = forward
        fwd._caches_in_training = split
    tr.log.close()
    return {"mig_over_grpo": paired(wall["mig"], wall["grpo"]),
            "mig_one_call_over_grpo": paired(wall["mig_one_call"], wall["grpo"]),
            "decoder_calls": {n: wall[f"{n}_calls"] for n in names},
            "rows": batch.n, "micro_batch_size": cfg.trainer.micro_batch_size}


# --------------------------------------------------------------------------------------------------
# P3: our GRPO / TRL GRPOTrainer, and GEN


def p3_workload(tmp: Path, args) -> tuple[Path, Path, list[str]]:
    """The random-init tiny Qwen2-VL, a small CLEVR-like set, and our config overrides of the P3 workload."""
    from vlm_mig.data.clevr import write_clevr
    from vlm_mig.models import tiny_model_dir

    model = tiny_model_dir("qwen2-vl", 0)  # warm-up 0: the random initialisation
    steps = args.warmup + args.pairs
    write_clevr(tmp / "p3-data", 2 * steps + 2, seed=3, question_mix="multistep")
    overrides = [f"model.name_or_path={model}", "model.freeze_patch_embed=false", "model.dtype=float32",
                 f"data.train={tmp / 'p3-data' / 'data.jsonl'}", "data.format=jsonl",
                 f"rollout.num_generations={args.G}", f"rollout.max_new_tokens={args.new_tokens}",
                 "rollout.temperature=1.0", "rollout.top_p=1.0",
                 "loss.alpha=0", "loss.gamma=0", "loss.beta=1", f"loss.kl_coef={args.kl}", "loss.normalizer=grpo",
                 "loss.eps_clip=0.2", "trainer.prompts_per_step=2", f"trainer.micro_batch_size={args.G}",
                 "trainer.num_iterations=1", f"trainer.threads={args.threads}", f"optim.lr={args.lr}",
                 "optim.weight_decay=0", "optim.warmup_steps=0", "optim.schedule=constant_with_warmup",
                 "optim.max_grad_norm=1.0"]
    return model, tmp / "p3-data" / "data.jsonl", overrides


def trivial_reward(prompts, completions, **_):
    """Cheap and varied within a group, so advantages are not all zero: distinct characters / 10."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else "".join(p.get("content", "") if isinstance(p.get("content"), str) else ""
                                                    for p in c)
        out.append(len(set(text)) / 10)
    return out


def run_p3(tmp: Path, args) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from datasets import Dataset
    from vlm_mig.processing import build_messages, encode_prompts, load_images

    model_dir, _, overrides = p3_workload(tmp, args)
    ours = make_trainer(None, tmp / "p3-ours", overrides)
    steps = args.warmup + args.pairs
    per_step = [ours.batch_for(i, 2)[0] for i in range(steps)]
    cfg = ours.cfg
    rows = []
    for batch in per_step:
        for s in batch:
            (image,) = load_images(s, cfg.rollout.min_pixels, cfg.rollout.max_pixels)
            rows.append({"prompt": build_messages(s, ours.template), "image": image, "sid": s.id})
    dataset = Dataset.from_list(rows)

    targs = GRPOConfig(
        output_dir=str(tmp / "p3-trl"), per_device_train_batch_size=args.G, gradient_accumulation_steps=2,
        num_generations=args.G, max_completion_length=args.new_tokens, beta=args.kl, num_iterations=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2,
        temperature=1.0, top_p=1.0, top_k=0, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to=[], logging_steps=1000000,
        save_strategy="no", max_steps=steps, shuffle_dataset=False, seed=0, disable_dropout=True,
        log_completions=False, dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"dtype": "float32"},
        remove_unused_columns=False)

    seen_trl: list[list[str]] = []

    def reward(prompts, completions, sid=None, **kw):
        seen_trl.append(sorted(set(sid or [])))
        return trivial_reward(prompts, completions)

    record: dict[str, list] = {k: [] for k in ("trl", "ours", "trl_gen", "ours_rows", "trl_len", "ours_sids",
                                                "trl_prompt", "trl_between")}

    class Alternate(TrainerCallback):
        """TRL's step (on_step_begin -> on_step_end), then ours on the same prompts, timed apart."""

        t_ours_end: float | None = None

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()
            if self.t_ours_end is not None:  # TRL's loop between two steps: logging, fetching the next batch
                record["trl_between"].append(self.t0 - self.t_ours_end)

        def on_step_end(self, a, state, control, **kw):
            record["trl"].append(time.perf_counter() - self.t0)
            i = state.global_step - 1
            dt, m = timed_step(ours, i)
            record["ours"].append(dt)
            record["ours_rows"].append(m)
            record["ours_sids"].append(sorted(s.id for s in per_step[i]))
            self.t_ours_end = time.perf_counter()
            print(f"  p3 pair {i}{' (warm-up)' if i < args.warmup else ''}: TRL {record['trl'][-1]:.3f} s, "
                  f"ours {dt:.3f} s", flush=True)

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[reward], args=targs, train_dataset=dataset,
                          processing_class=ours.processor, callbacks=[Alternate()])
    inner = trainer._generate

    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = inner(prompts)
        record["trl_gen"].append(time.perf_counter() - t0)
        record["trl_len"].append(statistics.mean(len(c) for c in out[1]))
        record["trl_prompt"].append(sorted({len(p) for p in out[0]}))
        return out

    trainer._generate = timed_generate
    torch.set_num_threads(args.threads)
    trainer.train()

    w = args.warmup
    ours_prompts = encode_prompts(ours.processor, per_step[0], ours.template, None, cfg.rollout.min_pixels,
                                  cfg.rollout.max_pixels)
    n_params = {"ours": sum(p.numel() for p in ours.model.parameters() if p.requires_grad),
                "trl": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    out = {"model": str(model_dir), "prompts": 2, "G": args.G, "max_new_tokens": args.new_tokens, "kl": args.kl,
           "lr": args.lr, "threads": args.threads, "warmup_pairs": w,
           "ours_over_trl": paired(record["ours"][w:], record["trl"][w:]),
           "ours_phases": median_phases(record["ours_rows"][w:]),
           # outside TRL's timed window (on_step_begin -> on_step_end): its loop's work between two steps
           "trl_between_steps_median_s": statistics.median(record["trl_between"]) if record["trl_between"] else None,
           "generate": {"trl_median_s": statistics.median(record["trl_gen"][w:]),
                        "ours_median_s": statistics.median(r["time/generate"] for r in record["ours_rows"][w:]),
                        "ours_over_trl": paired([r["time/generate"] for r in record["ours_rows"][w:]],
                                                record["trl_gen"][w:])},
           "completion_length": {"ours": statistics.mean(r["length/completion"] for r in record["ours_rows"][w:]),
                                 "trl": statistics.mean(record["trl_len"][w:])},
           "prompt_tokens": {"ours": ours_prompts.attention_mask.sum(-1).tolist(), "trl": record["trl_prompt"][0]},
           "trainable_parameters": n_params,
           "same_prompts_every_pair": seen_trl[: len(record["ours_sids"])] == record["ours_sids"]}
    ours.log.close()
    return out


def run_gen(tmp: Path, args) -> dict:
    """The hf engine (seeded, as the trainer calls it; unseeded) against a bare ``model.generate``, alternated."""
    import torch

    from vlm_mig.data.sources import load_source
    from vlm_mig.models import load_model, load_processor
    from vlm_mig.processing import PromptTemplate, encode_prompts
    from vlm_mig.rollout import RolloutConfig, make_engine, repeat_prompts
    from vlm_mig.rollout.sampling import rollout_seed

    model_dir, data, _ = p3_workload(tmp, args)
    samples = load_source(str(data), task="count", cache_dir=tmp / "gen-cache", fmt="jsonl")[:2]
    torch.set_num_threads(args.threads)
    model = load_model(str(model_dir)).eval()
    processor = load_processor(str(model_dir))
    template = PromptTemplate()  # the config default (data.system_prompt: default), as P3's trainer uses
    rc = RolloutConfig(num_generations=args.G, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0)
    engine = make_engine(rc, model, processor, template)
    batch = repeat_prompts(encode_prompts(processor, samples, template), args.G)
    gen = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": args.new_tokens,
           "eos_token_id": engine.eos_ids, "pad_token_id": engine.pad_id}
    width = batch.input_ids.shape[1]
    tokens = {"bare": [], "seeded": [], "unseeded": []}

    def bare():
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**batch.model_inputs(), **gen)
        tokens["bare"].append(int((out[:, width:] != engine.pad_id).sum()))

    def seeded(i):
        r = engine.generate(samples, [rollout_seed(0, i, j) for j in range(len(samples))])
        tokens["seeded"].append(int(r.completion_mask.sum()))

    def unseeded():
        torch.manual_seed(0)
        r = engine.generate(samples)
        tokens["unseeded"].append(int(r.completion_mask.sum()))

    times: dict[str, list[float]] = {"bare": [], "seeded": [], "unseeded": []}
    for i in range(args.warmup + args.pairs):
        for name, fn in (("seeded", lambda: seeded(i)), ("bare", bare), ("unseeded", unseeded)):
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    w = args.warmup
    return {"model": str(model_dir), "prompts": len(samples), "G": args.G, "max_new_tokens": args.new_tokens,
            "threads": args.threads, "warmup_rounds": w,
            "engine_seeded_over_bare": paired(times["seeded"], times["bare"]),
            "engine_unseeded_over_bare": paired(times["unseeded"], times["bare"]),
            "generated_tokens": {k: statistics.mean(v[w:]) for k, v in tokens.items()}}


# --------------------------------------------------------------------------------------------------


def demo_configs(demo: Path, seed: int) -> tuple[Path, Path]:
    pair = demo / "configs" / f"grpo-seed{seed}.yaml", demo / "configs" / f"mig-seed{seed}.yaml"
    missing = [str(p) for p in pair if not p.is_file()]
    if missing:
        sys.exit(f"{demo} is not a finished demo: missing {', '.join(missing)} (or pass --config-grpo/--config-mig)")
    return pair


def ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def print_tables(res: dict) -> None:
    from vlm_mig.report import markdown_table

    rows = []

    def row(label: str, r: dict, goal: str = "") -> None:
        rows.append([label, ms(r["a_median_s"]), ms(r["b_median_s"]),
                     f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]", r["pairs"], goal])

    if "p2" in res:
        row("P2 MIG step / GRPO step (demo start)", res["p2"]["mig_over_grpo"], "<= 1.05")
    if "upd" in res:
        row("update stage: MIG (scored in it) / GRPO", res["upd"]["mig_over_grpo"])
        row("update stage: MIG, copies in the pass with gradient / GRPO", res["upd"]["mig_one_call_over_grpo"])
    if "p3" in res:
        row("P3 our GRPO step / TRL GRPOTrainer step", res["p3"]["ours_over_trl"], "<= 0.80")
        row("generate inside the step: ours / TRL's", res["p3"]["generate"]["ours_over_trl"])
    if "gen" in res:
        row("hf engine (seeded) / bare model.generate", res["gen"]["engine_seeded_over_bare"])
        row("hf engine (unseeded) / bare model.generate", res["gen"]["engine_unseeded_over_bare"])
    print(markdown_table(["measurement", "A (median)", "B (median)", "A/B median of pairs [min, max]", "pairs",
                          "goal"], rows))
    if "p2" in res:
        ph = res["p2"]["phases"]
        print("\nP2 phases (median s): " + "; ".join(
            f"{k}: " + ", ".join(f"{p} {v:.3f}" for p, v in ph[k].items()) for k in ("mig", "grpo")))
    if "p3" in res:
        print("P3 our phases (median s): " + ", ".join(f"{p} {v:.3f}" for p, v in res["p3"]["ours_phases"].items()))
        print(f"P3 same prompts every pair: {res['p3']['same_prompts_every_pair']}; prompt tokens "
              f"{res['p3']['prompt_tokens']}; completion length {res['p3']['completion_length']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", help="a finished `vlm-mig demo --out` folder (P2 uses its configs/{grpo,mig}-seedS)")
    ap.add_argument("--seed", type=int, default=0, help="which of the demo's seed configs P2 takes")
    ap.add_argument("--config-grpo", help="P2's GRPO config (instead of --demo)")
    ap.add_argument("--config-mig", help="P2's MIG config (instead of --demo)")
    ap.add_argument("--override", action="append", help="extra section.key=value for both P2 configs")
    ap.add_argument("--keep-lr", action="store_true", help="P2 keeps the recipe's lr (default: optim.lr=0)")
    ap.add_argument("--parts", default="p2,upd,p3,gen", help=f"comma-separated, of {','.join(PARTS)}")
    ap.add_argument("--pairs", type=int, default=5, help="timed pairs per comparison")
    ap.add_argument("--warmup", type=int, default=1, help="pairs run first and dropped")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo runs with 1)")
    ap.add_argument("--G", type=int, default=8, help="P3/GEN: completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="P3/GEN: max new tokens")
    ap.add_argument("--kl", type=float, default=0.04, help="P3: KL weight (TRL's beta, our loss.kl_coef)")
    ap.add_argument("--lr", type=float, default=1e-6, help="P3: learning rate of both sides")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"--parts: unknown {bad}; choose from {PARTS}")
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    if "p2" in parts or "upd" in parts:
        if args.config_grpo and args.config_mig:
            p2_pair = Path(args.config_grpo), Path(args.config_mig)
        elif args.demo:
            p2_pair = demo_configs(Path(args.demo), args.seed)
        else:
            ap.error("P2 needs --demo or both --config-grpo and --config-mig")

    import torch
    import transformers

    import vlm_mig

    res: dict = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
                 "vlm_mig": str(Path(vlm_mig.__file__).parent), "cpus": os.cpu_count(),
                 "pairs": args.pairs, "warmup": args.warmup, "argv": sys.argv[1:] if argv is None else argv}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        if "p2" in parts:
            res["p2"] = run_p2(*p2_pair, tmp_path, args)
        if "upd" in parts:
            res["upd"] = run_upd(p2_pair[1], tmp_path, args)
        if "p3" in parts:
            import trl

            res["trl"] = trl.__version__
            res["p3"] = run_p3(tmp_path, args)
        if "gen" in parts:
            res["gen"] = run_gen(tmp_path, args)
        res["seconds"] = round(time.perf_counter() - t0, 1)
    print()
    print_tables(res)
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

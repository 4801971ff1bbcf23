"""``vlm-mig eval``: the subcommand and its handler."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from vlm_mig.data.schema import TASK_TYPES, DataError
from vlm_mig.data.suites import SOURCES, BenchmarkSpec
from vlm_mig.evaluation.options import (
    EXTRACTIONS,
    SAMPLING_TEMPERATURE,
    SAMPLING_TOP_P,
    EvalOptions,
    sampling_from_run_config,
    template_from_run_config,
)
from vlm_mig.evaluation.records import GRADERS
from vlm_mig.evaluation.reports import markdown_table
from vlm_mig.evaluation.suites import Suite, load_suite, run_suite, suites_dir
from vlm_mig.outputs import check_output


def add_eval_command(subparsers: Any) -> None:
    """Add the ``eval`` subcommand (its handler returns the exit code) to a ``vlm-mig`` subparsers object."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on benchmark suites (pass@1 / pass@k, results.json, samples.jsonl, results.md)",
        description="Zero-shot evaluation. Interrupted runs resume from OUT/samples.jsonl.",
    )
    p.add_argument("--model", help="model folder or hub id (not needed with --gold or --list)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--suite", help="suite name (eval/NAME.yaml: ood, superclevr, clevr) or a YAML path")
    which.add_argument(
        "--task",
        help="one benchmark: a registry name (gsm8k, superclevr, clevr_cogen_b, arithmetic, ...) or a task type "
        "(count, math, numeric, mc, text) for the jsonl in --data",
    )
    which.add_argument("--list", action="store_true", help="list the benchmark registry and the suites, then exit")
    p.add_argument("--data", help="local data of a benchmark that reads one (superclevr folder, a user jsonl)")
    p.add_argument("--format", default=None, help="how to read --data: auto | jsonl | r1v | superclevr")
    p.add_argument("--limit", type=int, help="first N items of each benchmark")
    p.add_argument("--samples", type=int, help="K completions per item (default 1: greedy); K > 1 reports pass@k")
    p.add_argument("--temperature", type=float,
                   help="sampling temperature (default 0 for K = 1; for K > 1 the checkpoint's rollout temperature "
                        f"from its run_config.json, else {SAMPLING_TEMPERATURE})")
    p.add_argument("--top-p", type=float, help="nucleus threshold (default 1 greedy; sampling: the checkpoint's "
                   f"rollout top-p, else {SAMPLING_TOP_P})")
    p.add_argument("--max-new-tokens", type=int, help=f"completion budget (default {EvalOptions.max_new_tokens})")
    p.add_argument("--batch-size", type=int, help=f"prompts per generate call (default {EvalOptions.batch_size})")
    p.add_argument("--seed", type=int, help=f"sampling seed (default {EvalOptions.seed})")
    p.add_argument("--template", help="prompt: default | r1v | chat (default: the checkpoint's training prompt, "
                   "read from its run_config.json, else default)")
    p.add_argument("--extraction", choices=EXTRACTIONS, help="strict: tagged answers only (default); fallback")
    p.add_argument("--gold", action="store_true", help="grade the reference solutions instead of a model")
    p.add_argument("--out", help="output folder (default eval_out/<model>/<suite or task>)")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    """Handler of ``vlm-mig eval``: 0 on success, 1 when every benchmark was skipped, 2 on bad input."""
    try:
        return _eval_command(args)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _eval_command(args: argparse.Namespace) -> int:
    if args.list:
        print(describe_registry())
        return 0
    if not args.suite and not args.task:
        raise DataError("give --suite NAME_OR_PATH or --task NAME (or --list)")
    if not args.model and not args.gold:
        raise DataError("--model is required (or --gold to grade the reference solutions)")
    suite, strict = _suite_of(args)
    forced = {
        k: v
        for k, v in {
            "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "limit": args.limit,
            "seed": args.seed, "extraction": args.extraction, "template": args.template,
        }.items()
        if v is not None
    }  # fmt: skip
    suite.options_for(suite.benchmarks[0].name, EvalOptions(), forced)  # validate flags before loading a model
    if args.out:
        check_output(args.out, "--out", folder=True)
    model = processor = None
    base = EvalOptions()
    if args.gold:
        # Grading reference solutions needs no weights; the tokenizer (if given) only measures lengths.
        processor = _load_processor(args.model) if args.model else None
        model_label = "gold"
    else:
        model, processor, model_label = _load(args)
        if Path(args.model).is_dir():
            # The checkpoint's own prompt, and for K > 1 samples its rollout temperature and top-p (flags win).
            base = dataclasses.replace(base, template=template_from_run_config(args.model),
                                       **sampling_from_run_config(args.model))
    out = Path(args.out) if args.out else Path("eval_out") / Path(model_label).name / suite.name
    t0 = time.perf_counter()
    result = run_suite(
        model, processor, suite, base, forced=forced, out_dir=out, model_name=model_label, gold=args.gold,
        strict_images=strict, progress=not args.no_progress,
    )
    print(markdown_table(result))
    print(f"wrote {out}/results.json, results.md, samples.jsonl ({time.perf_counter() - t0:.1f} s)")
    return 0 if result.results else 1


def _suite_of(args: argparse.Namespace) -> tuple[Suite, bool]:
    """The suite to run and whether a benchmark needing images is an error (``--task``) or a skip."""
    if args.suite:
        suite = load_suite(args.suite)
        if args.data:
            takers = [spec for spec in suite.benchmarks if spec.entry.needs_data and spec.data is None]
            if not takers:
                raise DataError(f"--data: no benchmark of suite {suite.name!r} reads a local folder without one")
            for spec in takers:
                spec.data = args.data
        if args.format:
            takers = [spec for spec in suite.benchmarks if spec.data is not None and "format" in spec.entry.options]
            if not takers:
                raise DataError(f"--format: no benchmark of suite {suite.name!r} reads local data")
            for spec in takers:
                spec.format = args.format
        return suite, False
    task = args.task
    if task in SOURCES and task != "jsonl":
        spec = BenchmarkSpec(name=task, data=args.data, format=args.format or "auto")
        if spec.data is not None and "data" not in spec.entry.options:
            raise DataError(f"benchmark {task!r} does not read --data")
        if args.format and "format" not in spec.entry.options:
            raise DataError(f"benchmark {task!r} does not read --format")
    elif task in TASK_TYPES:
        if not args.data:
            raise DataError(f"--task {task} is a task type: give the jsonl to grade with it as --data PATH")
        spec = BenchmarkSpec(name=Path(args.data).stem, source="jsonl", data=args.data, task=task,
                             format=args.format or "auto")
    else:
        raise DataError(f"--task {task!r}: not a benchmark ({', '.join(SOURCES)}) nor a task type {TASK_TYPES}")
    return Suite(name=spec.name, benchmarks=[spec]), True


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    import torch

    from vlm_mig.models import check_model_path, load_model, load_processor

    check_model_path(args.model, "--model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = load_model(args.model, dtype=dtype, device=device)
    processor = load_processor(args.model)
    label = str(Path(args.model).resolve()) if Path(args.model).exists() else str(args.model)
    return model, processor, label


def _load_processor(path: str) -> Any:
    from vlm_mig.models import load_processor

    return load_processor(path)


def describe_registry() -> str:
    """The registry (task, grader, whether images are needed) and the suites, for ``--list``."""
    lines = ["benchmarks (every one uses the run's prompt template: the checkpoint's training prompt, else "
             "PromptTemplate(); a suite or --template may set another):"]
    for src in SOURCES.values():
        task = src.task or "given by 'task'"
        grader = GRADERS.get(src.task, "by task type") if src.task else "by task type"
        images = {True: "images", False: "text", None: "text or images"}[src.needs_images]
        lines.append(f"  {src.name:<14} {images:<14} task {task:<16} grader: {grader}\n      {src.description}")
    d = suites_dir()
    suites = sorted(f.stem for f in d.glob("*.yaml")) if d.is_dir() else []
    lines.append(f"suites in {d}: {', '.join(suites) or '(none)'}")
    return "\n".join(lines)

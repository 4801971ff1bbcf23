"""Does the embedded tiny Qwen2-VL see? SFT on CLEVR-like multi-step counting, against its controls.

The demo's first half, with a learning curve: the tiny VLM with its vision warm-up (built once, cached), the
demo's data (multi-step questions, condition A; the OOD set under condition B), then two identical SFT runs
side by side, one on the real scenes and one on blank (constant grey) images, each validated on its own ID set
every ``--eval-every`` steps and evaluated greedily at the end. Reported beside each other: accuracy, the
blind prior (the most common training answer per question type), the share of completions whose stated counts
all match the scene, and the number of distinct greedy answers. A model that reads the question but not the
image lands at the blank-image control; one that sees lands clearly above it and the blind prior.

    python bench/tiny_learnability.py [--out runs/tiny_learnability] [--sft-steps 600] [--eval-every 200]
                                      [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from vlm_mig import report as rep
from vlm_mig.demo import data as dd
from vlm_mig.demo.plan import CLEAN, quick_of
from vlm_mig.demo.run import machine, model_and_data, sft_phase
from vlm_mig.timing import StageClock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny_learnability")
    ap.add_argument("--sft-steps", type=int, default=None, help=f"default: the demo's ({CLEAN.sft_steps})")
    ap.add_argument("--eval-every", type=int, default=200, help="validation on the ID set every N SFT steps")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick sizes (a smoke test)")
    ap.add_argument("--json")
    args = ap.parse_args()
    plan = quick_of(CLEAN) if args.quick else CLEAN  # the gold-solution SFT beside its blank-image control
    if args.sft_steps:
        plan = dataclasses.replace(plan, sft_steps=args.sft_steps)
    out = Path(args.out)
    timer, per_job, viewer = StageClock(), {}, {}
    results: dict = {}
    t0 = time.perf_counter()
    machine_at_start = machine()
    parallel = (machine_at_start["cores"] or 1) >= 2  # as the demo decides
    model_path, warmup, paths = model_and_data(plan, out / "data", parallel, timer)
    blind = dd.blind_baseline_of(paths)
    sft_phase(plan, paths, out, threads=1, report_to=[], parallel=parallel, results=results, viewer=viewer,
              timer=timer, per_job=per_job, validate_every=args.eval_every)
    total = time.perf_counter() - t0

    curves = {label: rep.series(rep.read_jsonl(out / "runs" / label / "metrics.jsonl"), "val/accuracy")
              for label in ("sft", "sft-blank")}
    rows = []
    for label, name in (("sft", "SFT, real images"), ("sft-blank", "SFT, blank images (control)")):
        r = results[label]
        rows.append([name, *[f"{100 * r[s]['accuracy']:.1f}%" for s in ("id", "ood")],
                     *[f"{100 * r[s]['counts_match_scene']:.1f}%" for s in ("id", "ood")],
                     r["id"]["distinct_answers"], " -> ".join(f"{100 * v:.0f}% ({k})" for k, v in zip(*curves[label]))])
    rows.append(["blind prior (most common training answer per question type)",
                 *[f"{100 * blind[s]['accuracy']:.1f}%" for s in ("id", "ood")], "–", "–", "–", ""])
    print(rep.markdown_table(["model", "ID accuracy", "OOD accuracy", "ID counts match scene",
                              "OOD counts match scene", "distinct ID answers",
                              f"ID validation ({plan.val_scenes} items) by SFT step"], rows))
    margin = results["sft"]["id"]["accuracy"] - blind["id"]["accuracy"]
    control = results["sft"]["id"]["accuracy"] - results["sft-blank"]["id"]["accuracy"]
    print(f"\nSFT on real images: {100 * margin:+.1f} points over the blind prior, {100 * control:+.1f} over the "
          f"blank-image control ({plan.sft_steps} steps of {plan.sft_batch}; {rep.fmt_seconds(total)} in all)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "plan": dataclasses.asdict(plan), "machine": machine_at_start, "model": str(model_path), "warmup": warmup,
            "results": results, "blind_baseline": blind, "validation_curves": curves,
            "margin_over_blind_prior": margin, "margin_over_blank_control": control,
            "wall_time_s": {**timer.rounded(1), "total": round(total, 1)},
            "job_time_s": {k: round(v, 1) for k, v in per_job.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()

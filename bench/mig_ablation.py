"""Variants of a finished demo's MIG (or GRPO) recipe against its GRPO runs: same SFT start, seeds, data order and
budget.

Each variant is the demo's MIG recipe (``configs/mig-seed<s>.yaml``; ``--recipe grpo``: its GRPO recipe) with config
overrides, e.g. the process weight ``loss.alpha`` or ``advantage.process_scale=match_outcome`` (the process
advantage rescaled to the outcome advantage's root mean square), or a loss option on GRPO (``--recipe grpo --variant
gspo:loss.importance_sampling=sequence``). Every run is evaluated greedily on the demo's ID and OOD sets, and paired
with the demo's GRPO and MIG runs of the same seed (a two-level bootstrap over seeds and items). Also reported: the
part of the process advantage that sits in groups whose outcomes are all equal (``adv/proc_share_equal_outcome``:
where GRPO has no gradient), the sampled training accuracy at the start and the end, and the run mean of the
metrics an option moves (``WATCHED``: policy entropy, truncated share, overlong penalty, rollout mismatch, kept
entropy share, dynamic sampling's draws and groups).

    python bench/mig_ablation.py --demo out/demo5 --seeds 3 \\
        --variant alpha0.5:loss.alpha=0.5 --variant matched:advantage.process_scale=match_outcome [--json out.json]

Runs go to ``<demo>/runs/ablation/<variant>-seed<s>``, two side by side (one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _common import write_json  # noqa: E402

#: Metrics an option moves, reported as their mean over each run's steps (absent ones are left out).
WATCHED = ("policy/entropy", "policy/entropy_reasoning", "policy/entropy_answer", "loss/truncated_frac",
           "reward/overlong", "loss/rollout_logp_diff", "loss/rollout_kl", "loss/rollout_capped_frac",
           "loss/entropy_kept_frac_out", "loss/seq_ratio_mean_out", "loss/clip_frac_out", "adv/zero_std_out",
           "filter/draws", "filter/groups_drawn", "filter/groups_kept", "filter/groups_filled", "filter/groups_surplus",
           "filter/dropped_solved", "filter/dropped_unsolved", "filter/dropped_flat", "filter/accuracy_drawn")


def watched(runs: list[list[dict]]) -> dict[str, float]:
    """The mean of each ``WATCHED`` metric over all steps of ``runs`` (the metrics.jsonl rows of each run)."""
    from vlm_mig import report as rep

    out = {}
    for key in WATCHED:
        values = [v for rows in runs for v in rep.series(rows, key)[1]]
        if values:
            out[key] = statistics.fmean(values)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="a finished `vlm-mig demo --out` folder")
    ap.add_argument("--seeds", type=int, default=3, help="RL seeds 0..N-1 (the demo must have run them)")
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME:key=value[,key=value...] overrides of the demo's recipe")
    ap.add_argument("--recipe", choices=("mig", "grpo"), default="mig", help="which of the demo's recipes to vary")
    ap.add_argument("--serial", action="store_true", help="one run at a time (default: two side by side)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import yaml

    from vlm_mig import report as rep
    from vlm_mig.config import merge_dicts
    from vlm_mig.demo.jobs import run_jobs
    from vlm_mig.demo.measure import credit_over_training, paired_difference, training_trend
    from vlm_mig.demo.plan import DemoPlan, write_recipe
    from vlm_mig.demo.run import _job

    demo = Path(args.demo)
    full = json.loads((demo / "results.json").read_text())
    plan = DemoPlan(**full["plan"])
    if args.seeds > len(full["results"]["grpo"]):
        sys.exit(f"{demo} ran {len(full['results']['grpo'])} seed(s); --seeds {args.seeds} needs as many")
    sets = {"id": Path(full["data"]["test_id"]), "ood": Path(full["data"]["test_ood"])}
    variants = []
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        changes: dict = {}
        for kv in filter(None, overrides.split(",")):
            key, _, value = kv.partition("=")
            section, _, field = key.partition(".")
            changes = merge_dicts(changes, {section: {field: yaml.safe_load(value)}})
        variants.append((name, changes))
    t0 = time.perf_counter()
    jobs = []
    for name, changes in variants:
        for seed in range(args.seeds):
            label = f"{name}-seed{seed}"
            run_dir = demo / "runs" / "ablation" / label
            recipe = merge_dicts(yaml.safe_load((demo / "configs" / f"{args.recipe}-seed{seed}.yaml").read_text()),
                                 changes)
            recipe["trainer"].update(output_dir=str(run_dir), progress_desc=label)
            cfg = demo / "configs" / "ablation" / f"{label}.yaml"
            write_recipe(recipe, cfg, f"{args.recipe.upper()} variant {name} of {demo}, seed {seed}: {changes}")
            jobs.append(_job("rl", label, cfg, run_dir, sets, plan, demo / "ablation", 1, name, viewer=False,
                             start=full["sft_checkpoint"]))
    side = 1 if args.serial else 2  # as the demo runs its phases: two processes at a time
    results = [r for i in range(0, len(jobs), side) for r in run_jobs(jobs[i : i + side], parallel=side > 1)]
    out: dict = {"demo": str(demo), "seeds": args.seeds, "variants": {}}
    base = {m: full["results"][m][: args.seeds] for m in ("grpo", "mig")}
    for name, changes in variants:
        runs = [res for job, res in zip(jobs, results) if job["label"].rsplit("-seed", 1)[0] == name]
        metrics = [rep.read_jsonl(demo / "runs" / "ablation" / f"{name}-seed{s}" / "metrics.jsonl")
                   for s in range(args.seeds)]
        share = [(credit_over_training(rows) or {}).get("proc_share_equal_outcome") for rows in metrics]
        v = {"overrides": changes,
             "accuracy": {s: [r["ev"][s]["accuracy"] for r in runs] for s in sets},
             "weights": [r["weights"]["relative_change"] for r in runs if r.get("weights")],
             "proc_share_equal_outcome": share,
             "training_accuracy": training_trend({"v": metrics}, plan.smooth_window)["v"],
             "watched": watched(metrics)}
        for other in ("grpo", "mig"):
            v[f"minus_{other}"] = {s: paired_difference([r[s]["correct"] for r in base[other]],
                                                        [r["ev"][s]["correct"] for r in runs], plan.bootstrap)
                                   for s in sets}
        out["variants"][name] = v
    out["base_watched"] = {m: watched([rep.read_jsonl(Path(r["run"]) / "metrics.jsonl") for r in base[m]])
                           for m in ("grpo", "mig")}
    out["seconds"] = round(time.perf_counter() - t0, 1)

    def pts(d: dict) -> str:
        return f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"

    rows = []
    for m in ("grpo", "mig"):
        rows.append([f"demo {m.upper()}", *[rep.fmt_pct([r[s]["accuracy"] for r in base[m]]) for s in sets],
                     "–", "–", "–"])
    for name, v in out["variants"].items():
        shares = [x for x in v["proc_share_equal_outcome"] if x is not None]
        rows.append([name, *[rep.fmt_pct(v["accuracy"][s]) for s in sets], *[pts(v["minus_grpo"][s]) for s in sets],
                     f"{100 * statistics.fmean(shares):.0f}%" if shares else "–"])
    print(rep.markdown_table(["run", "ID accuracy", "OOD accuracy", "ID minus GRPO [95%, seeds x items]",
                              "OOD minus GRPO", "process advantage in equal-outcome groups"], rows))
    cols = [k for k in WATCHED if any(k in w for w in (*out["base_watched"].values(),
                                                       *(v["watched"] for v in out["variants"].values())))]
    table = [[f"demo {m.upper()}", *[f"{w[k]:.4g}" if k in w else "–" for k in cols]]
             for m, w in out["base_watched"].items()]
    table += [[name, *[f"{v['watched'][k]:.4g}" if k in v["watched"] else "–" for k in cols]]
              for name, v in out["variants"].items()]
    print("\nRun means over the training steps:\n" + rep.markdown_table(["run", *cols], table))
    print(f"\n{out['seconds']} s")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much does the demo's SFT depend on one knob? The demo's SFT recipe with one thing changed, measured.

The recipe is the SFT on the clean gold solutions (`vlm-mig demo --plan clean`; the default testbed trains the
same recipe on an imperfect teacher's solutions and uses this one as its ceiling).

Builds the tiny VLM with the given vision warm-up (the default one comes from the cache; others are built
into ``--out/models``), draws the demo's data (``--train-scenes`` scenes instead of the demo's, if given),
runs the demo's SFT recipe with the given overrides and evaluates it greedily on the demo's ID and OOD sets.
One run per call, one thread: run two calls side by side on two cores. The blind prior of the sets is printed
beside the result.

    python bench/sft_variants.py --name equal-weight                       # the demo's SFT as it is
    python bench/sft_variants.py --name w01 --whole-image-weight 0.1       # the warm-up before it weighed 1.0
    python bench/sft_variants.py --name s1 --seed 1                        # another SFT seed
    python bench/sft_variants.py --name s900 --sft-steps 900 [--sft-batch 8] [--sft-lr 3e-3]
                                 [--warmup-steps 3000] [--train-scenes 10000] [--out runs/sft_variants]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from vlm_mig.demo import data as dd
from vlm_mig.demo.jobs import run_job
from vlm_mig.demo.plan import CLEAN, quick_of, sft_recipe, write_recipe
from vlm_mig.demo.run import _job, make_data
from vlm_mig.warmup import WarmupConfig


def model_for(out: Path, warmup_steps: int, whole_image_weight: float) -> Path:
    """The tiny VLM with this warm-up: the cached default, or a variant built once under ``out/models``."""
    from vlm_mig.models import build_tiny, tiny_model_dir

    default = WarmupConfig.for_steps(warmup_steps)
    if whole_image_weight == default.whole_image_weight:
        return tiny_model_dir("qwen2-vl", warmup_steps, progress=True)
    path = out / "models" / f"vision{warmup_steps}-whole{whole_image_weight:g}"
    if not (path / "model.safetensors").is_file():
        build_tiny(path, warmup=dataclasses.replace(default, whole_image_weight=whole_image_weight), progress=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="the run's folder under --out")
    ap.add_argument("--out", default="runs/sft_variants")
    ap.add_argument("--warmup-steps", type=int, help=f"default: the demo's ({CLEAN.warmup_steps})")
    ap.add_argument("--whole-image-weight", type=float, default=WarmupConfig.whole_image_weight)
    ap.add_argument("--train-scenes", type=int, help=f"default: the demo's ({CLEAN.train_scenes})")
    ap.add_argument("--sft-steps", type=int, help=f"default: the demo's ({CLEAN.sft_steps})")
    ap.add_argument("--sft-batch", type=int, help=f"default: the demo's ({CLEAN.sft_batch})")
    ap.add_argument("--sft-lr", type=float, help=f"default: the demo's ({CLEAN.sft_lr})")
    ap.add_argument("--seed", type=int, default=0, help="the SFT seed (data order)")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick sizes (a smoke test)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    out, t0 = Path(args.out), time.perf_counter()
    plan = quick_of(CLEAN) if args.quick else CLEAN  # the SFT on gold solutions (`vlm-mig demo --plan clean`)
    changed = {"warmup_steps": args.warmup_steps, "train_scenes": args.train_scenes, "sft_steps": args.sft_steps,
               "sft_batch": args.sft_batch, "sft_lr": args.sft_lr}
    plan = dataclasses.replace(plan, **{k: v for k, v in changed.items() if v is not None})
    model = model_for(out, plan.warmup_steps, args.whole_image_weight)
    paths = make_data(plan, out / "data")
    run_dir = out / args.name
    recipe = sft_recipe(plan, paths["train"], run_dir / "sft", threads=1, report_to=[], label=args.name)
    recipe["model"]["name_or_path"] = str(model)
    recipe["trainer"]["seed"] = args.seed
    config = run_dir / "sft.yaml"
    write_recipe(recipe, config, f"sft_variants {args.name}; rerun: vlm-mig sft --config <this file>")
    job = _job("sft", args.name, config, run_dir / "sft", {"id": paths["id"], "ood": paths["ood"]}, plan, run_dir,
               1, args.name, viewer=False)
    ev = run_job(job)["ev"]
    blind = dd.blind_baseline_of(paths)
    keep = ("accuracy", "counts_match_scene", "distinct_answers", "accuracy_by_question_type")
    result = {"args": vars(args), "model": str(model), "seconds": round(time.perf_counter() - t0, 1),
              **{s: {k: ev[s][k] for k in keep} for s in ("id", "ood")},
              "blind_prior": {s: blind[s]["accuracy"] for s in ("id", "ood")}}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

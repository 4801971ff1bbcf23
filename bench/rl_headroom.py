"""Is there something for RL to learn on this start? Headroom measured before training.

For the start of an RL run (its config: the model, the training data, the rollout temperature, G), on a
CLEVR-like test set with scene JSON (e.g. the demo's ID set):

- greedy accuracy; pass@k and majority@k of ``--samples`` completions per item at the rollout temperature
  (k = 1, 2, 4, ..., K); the blind sampler's pass@k (answers drawn from the training answers of the item's
  question type, no image);
- fixable: items wrong under greedy but right in at least 3 of 8 samples;
- the kinds of the greedy errors, read against the scene JSON: perception (a stated count the scene
  contradicts), arithmetic (counts right, an equation wrong), logic (counts and sums right, answer wrong),
  format;
- the gradient signal-to-noise of one RL step (``vlm_mig.rl.signal``): per group of rollouts, for the outcome
  term alone (the GRPO update), the process term alone and the run's configured loss, with 1/groups (pure
  noise) beside it and the cosine between the gradients of two independent batches.

    python bench/rl_headroom.py --config RUN.yaml --test TEST.jsonl [--samples 16] [--json out.json] [key=value ...]

The demo (``vlm-mig demo``) runs the same measurement on its start and ceiling and puts it in its report.
Deterministic for a config and thread count (one thread by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="an RL run's config (model = the start to measure)")
    ap.add_argument("--test", required=True, help="CLEVR-like test set (data.jsonl with scenes/ beside it)")
    ap.add_argument("--samples", type=int, default=16, help="completions per item at the rollout temperature")
    ap.add_argument("--limit", type=int, help="first N test items only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-signal", action="store_true", help="skip the gradient signal-to-noise")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vlm_mig.config import load_config
    from vlm_mig.demo.data import load, scene_objects
    from vlm_mig.demo.measure import headroom_of
    from vlm_mig.demo.summary import headroom_table, signal_table
    from vlm_mig.rl.signal import gradient_signal
    from vlm_mig.trainer import Trainer

    t0 = time.perf_counter()
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "vlm-mig-rl-headroom"
    # alpha = 1 so the scorer computes l_k: the process term's gradient is measured too.
    cfg = load_config(args.config, [*args.overrides, "loss.alpha=1", f"trainer.output_dir={out_dir}",
                                    "data.validation=null"])
    trainer = Trainer(cfg, mode="rl")
    test = Path(args.test)
    samples = load(test)[: args.limit]
    out: dict = {"config": args.config, "test": str(test), "model": cfg.model.name_or_path}
    if not args.no_signal:
        out["signal"] = gradient_signal(trainer)
    r = cfg.rollout
    out["headroom"] = headroom_of(trainer.model, trainer.processor, trainer.template, samples,
                                  scene_objects(test, samples), trainer.train_data, samples_k=args.samples,
                                  temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                  batch_size=cfg.eval.batch_size)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(headroom_table({"this start": out["headroom"]}))
    if "signal" in out:
        print()
        print(signal_table({"this start": out["signal"]}))
    print(f"\n{out['seconds']} s")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

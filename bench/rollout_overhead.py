"""Rollout engine overhead over a bare ``model.generate`` on the same batch (tiny Qwen2-VL, CPU).

Both sample the same prompts x G completions with the same seed and settings; the engine also encodes
the prompts (chat template, image loading and sizing), builds masks, texts and position ids. The last row
adds the teacher-forced fp32 old-log-prob pass a caller runs on the rollouts when it needs them
(``vlm_mig.forward.teacher_forced_logprobs``; the trainer gets them from its packed scoring pass instead).

    python bench/rollout_overhead.py [--prompts 2] [--G 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timeit  # noqa: E402

from vlm_mig.data.synthetic import write_clevr  # noqa: E402
from vlm_mig.forward import teacher_forced_logprobs  # noqa: E402
from vlm_mig.models import build_tiny, load_model, load_processor  # noqa: E402
from vlm_mig.processing import encode_prompts  # noqa: E402
from vlm_mig.rollout import RolloutConfig, make_engine, repeat_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_clevr(Path(tmp) / "d", n=args.prompts, seed=0)
        for s in samples:
            s.images = [str(Path(tmp) / "d" / p) for p in s.images]
        model = load_model(build_tiny(Path(tmp) / "m", seed=0)).eval()
        processor = load_processor(Path(tmp) / "m")
        # Same seed, inputs and settings: both sides sample the very same tokens.
        engine = make_engine(RolloutConfig(num_generations=args.G, max_new_tokens=args.new_tokens), model, processor)
        gen = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": args.new_tokens,
               "eos_token_id": engine.eos_ids, "pad_token_id": engine.pad_id}
        batch = repeat_prompts(encode_prompts(processor, samples), args.G)

        def bare():
            torch.manual_seed(0)
            with torch.no_grad():
                model.generate(**batch.model_inputs(), **gen)

        def run(logprobs: bool):
            torch.manual_seed(0)
            r = engine.generate(samples)
            if logprobs:
                teacher_forced_logprobs(model, r)

        results = {"bare model.generate": timeit(bare, args.repeats),
                   "engine": timeit(lambda: run(False), args.repeats),
                   "engine + old log-probs pass": timeit(lambda: run(True), args.repeats)}
    base = results["bare model.generate"]
    n = args.prompts * args.G
    print(f"{args.prompts} prompts x G={args.G} x {args.new_tokens} new tokens, {args.threads} threads")
    for name, t in results.items():
        print(f"  {name:30s} {t * 1e3:8.1f} ms  ~{n * args.new_tokens / t:6.0f} tok/s  overhead {t / base - 1:+.1%}")


if __name__ == "__main__":
    main()

"""Rollout engine cost against a bare ``model.generate`` on the same batch, and against the engine's previous
path (tiny Qwen2-VL, CPU), timed in alternation in one invocation.

Rows (each samples the same prompts x G completions with the same settings):

- ``bare model.generate``: ``generate`` on the G-times repeated, already encoded batch, global-RNG sampling.
- ``engine``: ``HFRolloutEngine.generate`` with the same global-RNG sampling (no seeds): prompt encoding
  (chat template, image loading and sizing), one prefill per prompt, masks, texts and position ids.
- ``engine, seeded``: the trainer's path, per-rollout ``SeededSampling`` (counter-based Gumbel noise).
- ``previous engine, seeded``: what the engine did before (kept here only): ``generate`` on the G-times
  repeated prompts (the vision tower and the prefill run G times per prompt) with the per-row seeded
  sampler (a ``torch.Generator`` reseeded and drawn for each row at every token).
- ``repeated prompts + new sampler``: the previous path with today's sampler, which splits the gain in two.
- ``engine + old log-probs pass``: adds the teacher-forced fp32 pass a caller runs on the rollouts when it
  needs old log-probs (``vlm_mig.forward.teacher_forced_logprobs``; the trainer gets them from its packed pass).

Each round runs every row once in turn; the table gives each row's median over the rounds and its ratio
to the bare ``generate`` and to the previous engine. ``--sampler`` adds the sampler alone (one call on
[rows, vocab] logits) at a few sizes, old per-row loop against the vectorised noise.

    python bench/rollout_overhead.py [--prompts 2] [--G 8] [--new-tokens 32] [--rounds 7] [--threads 1] [--sampler]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vlm_mig.data.synthetic import write_clevr  # noqa: E402
from vlm_mig.forward import teacher_forced_logprobs  # noqa: E402
from vlm_mig.models import build_tiny, load_model, load_processor  # noqa: E402
from vlm_mig.processing import encode_prompts  # noqa: E402
from vlm_mig.rollout import RolloutConfig, make_engine, repeat_prompts  # noqa: E402
from vlm_mig.rollout.base import assemble_rollouts  # noqa: E402
from vlm_mig.rollout.sampling import SeededSampling, rollout_seed, top_p_filter  # noqa: E402


class PerRowSeededSampling(LogitsProcessor):
    """The seeded sampler before the counter-based noise (bench only): a generator reseeded per row and step."""

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0):
        self.seeds, self.temperature, self.top_p = list(seeds), temperature, top_p
        self._prompt_width: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = top_p_filter(scores.float() / self.temperature, self.top_p)
        if self._prompt_width is None:
            self._prompt_width = input_ids.shape[1]
        step = input_ids.shape[1] - self._prompt_width
        noise = torch.empty_like(logits)
        gen = torch.Generator(device=logits.device)
        for i, seed in enumerate(self.seeds):
            gen.manual_seed((seed + step * 0x9E3779B97F4A7C15) % (2**63))
            u = torch.rand(logits.shape[1], generator=gen, device=logits.device, dtype=torch.float32)
            noise[i] = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))
        return logits + noise


def repeated_path(engine, samples, seeds, sampler_cls):
    """The engine's previous path: encode, repeat every prompt G times (images too), generate, assemble."""
    cfg = engine.config
    batch = encode_prompts(engine.processor, samples, engine.template, cfg.max_prompt_length, cfg.min_pixels,
                           cfg.max_pixels)
    repeated = repeat_prompts(batch, cfg.num_generations)
    row_seeds = [rollout_seed(s, j) for s in seeds for j in range(cfg.num_generations)]
    with torch.no_grad():
        out = engine.model.generate(**repeated.model_inputs(), do_sample=False,
                                    logits_processor=LogitsProcessorList([sampler_cls(row_seeds, cfg.temperature,
                                                                                      cfg.top_p)]),
                                    max_new_tokens=cfg.max_new_tokens, eos_token_id=engine.eos_ids,
                                    pad_token_id=engine.pad_id)
    return assemble_rollouts(engine.processor, samples, batch, out[:, repeated.input_ids.shape[1]:], engine.eos_ids,
                             engine.pad_id)


def alternate(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Every function once per round, in turn (after one warm-up round); all wall times per function."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t)
    return times


def sampler_table(rounds: int) -> None:
    print("sampler alone, one call on [rows, vocab] fp32 logits (median of alternated calls):")
    for rows, vocab in [(16, 602), (16, 49152), (16, 151936), (64, 151936), (256, 602)]:
        logits = torch.randn(rows, vocab)
        ids = torch.zeros(rows, 4, dtype=torch.long)
        seeds = [rollout_seed(0, i) for i in range(rows)]
        t = alternate({"per-row": lambda: PerRowSeededSampling(seeds)(ids, logits),
                       "vectorised": lambda: SeededSampling(seeds)(ids, logits)}, rounds)
        old, new = statistics.median(t["per-row"]), statistics.median(t["vectorised"])
        print(f"  {rows:4d} x {vocab:6d}  per-row {old * 1e3:8.2f} ms  vectorised {new * 1e3:8.2f} ms  "
              f"ratio {new / old:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampler", action="store_true", help="also time the sampler alone at a few sizes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_clevr(Path(tmp) / "d", n=args.prompts, seed=0)
        for s in samples:
            s.images = [str(Path(tmp) / "d" / p) for p in s.images]
        model = load_model(build_tiny(Path(tmp) / "m", seed=0)).eval()
        processor = load_processor(Path(tmp) / "m")
        # Same global seed, inputs and settings: the unseeded rows sample the very same tokens.
        engine = make_engine(RolloutConfig(num_generations=args.G, max_new_tokens=args.new_tokens), model, processor)
        gen = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": args.new_tokens,
               "eos_token_id": engine.eos_ids, "pad_token_id": engine.pad_id}
        batch = repeat_prompts(encode_prompts(processor, samples), args.G)
        seeds = list(range(args.prompts))

        def bare():
            torch.manual_seed(0)
            with torch.no_grad():
                model.generate(**batch.model_inputs(), **gen)

        def run(logprobs: bool = False, seeded: bool = False):
            torch.manual_seed(0)
            r = engine.generate(samples, seeds=seeds if seeded else None)
            if logprobs:
                teacher_forced_logprobs(model, r)

        new = engine.generate(samples, seeds=seeds)
        old = repeated_path(engine, samples, seeds, SeededSampling)
        same = torch.equal(new.completion_ids, old.completion_ids)
        times = alternate({
            "bare model.generate": bare,
            "engine": run,
            "engine, seeded": lambda: run(seeded=True),
            "previous engine, seeded": lambda: repeated_path(engine, samples, seeds, PerRowSeededSampling),
            "repeated prompts + new sampler": lambda: repeated_path(engine, samples, seeds, SeededSampling),
            "engine + old log-probs pass": lambda: run(logprobs=True),
        }, args.rounds)
    med = {name: statistics.median(t) for name, t in times.items()}
    base, prev = med["bare model.generate"], med["previous engine, seeded"]
    n = args.prompts * args.G
    print(f"{args.prompts} prompts x G={args.G} x {args.new_tokens} new tokens, {args.threads} threads, "
          f"{args.rounds} alternated rounds (medians); torch {torch.__version__}")
    print(f"seeded tokens of the engine == repeated prompts + the same sampler: {same}")
    print(f"  {'':32s} {'time':>9s} {'tok/s':>7s} {'/ bare':>7s} {'/ previous':>10s}")
    for name, t in med.items():
        print(f"  {name:32s} {t * 1e3:6.1f} ms {n * args.new_tokens / t:7.0f} {t / base:7.2f} {t / prev:10.2f}")
    if args.sampler:
        sampler_table(args.rounds)


if __name__ == "__main__":
    main()

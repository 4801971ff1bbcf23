"""Shared helpers for the benchmark scripts: timing and synthetic step-structured completions."""

from __future__ import annotations

import statistics
import time

import torch


def timeit(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_completion(tok, k: int, seed: int, answer: str) -> tuple[torch.Tensor, list[int]]:
    """A completion with ``k`` arithmetic steps, built piecewise so its cuts c_0..c_k are exact."""
    import random

    rng = random.Random(seed)
    pieces = ["<think>\n"]
    for i in range(k):
        a, b = rng.randrange(2, 50), rng.randrange(2, 50)
        pieces.append(f"### Step {i + 1}: we add {a} and {b} to get {a + b} items.\n")
    pieces += [f"</think>\n<answer>{answer}</answer>", tok.eos_token or ""]
    ids, cuts = [], []
    for j, p in enumerate(pieces):
        ids += tok.encode(p, add_special_tokens=False)
        if j <= k:
            cuts.append(len(ids))
    return torch.tensor(ids), cuts

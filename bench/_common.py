"""Shared helpers for the benchmark scripts: timing, synthetic step-structured completions, result files."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

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


def write_json(path: str | None, data: dict) -> None:
    """Write a bench's results to ``path`` (its folder made), if one was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

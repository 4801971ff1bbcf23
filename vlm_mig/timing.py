"""Wall-clock seconds per named phase: the trainer's step stages, the demo's and the benchmarks' phases."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["StageClock"]


class StageClock:
    """Seconds per named phase; a phase entered twice adds up.

    ``with clock("rollout"): ...`` times a block, ``clock.run("data", fn, *args)`` times a call and returns its
    result, ``clock.add("build", seconds)`` files a time measured elsewhere (another process, an overlapping
    span). ``clock.times`` holds the seconds by phase in the order first entered.
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, its seconds filed under ``name`` (also when it raises)."""
        with self(name):
            return fn(*args, **kwargs)

    def add(self, name: str, seconds: float) -> None:
        """File ``seconds`` under ``name`` (added to what the phase already holds)."""
        self.times[name] = self.times.get(name, 0.0) + seconds

    @property
    def total(self) -> float:
        """Sum over the phases (the wall time when they did not overlap)."""
        return sum(self.times.values())

    def rounded(self, ndigits: int = 2) -> dict[str, float]:
        """``times`` rounded for a report."""
        return {k: round(v, ndigits) for k, v in self.times.items()}

"""Dataclass fields that carry their allowed values, so a field's choices and bounds sit beside its default.

    backend: str = choice("hf", BACKENDS)  #: ...
    top_p: float = bounded(1.0, ge=0, le=1)  #: ...

``allowed`` says whether a value fits a field (the config loader turns a misfit into an error naming the dotted
key); ``check_fields`` validates a whole instance, for dataclasses that are also built directly in code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING
from typing import Any


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A numeric interval; each end inclusive unless marked open, None for unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # NaN compares false with every bound
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


def choice(default: Any = MISSING, options: Sequence[str] = (), *,
           default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A field whose value (each item, for a list) must be one of ``options``."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"choices": tuple(options)})


def bounded(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A numeric field within bounds: ``ge``/``gt`` below, ``le``/``lt`` above (None: no bound there)."""
    bounds = Bounds(lo=gt if gt is not None else ge, hi=lt if lt is not None else le, lo_open=gt is not None,
                    hi_open=lt is not None)
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def allowed(value: Any, metadata: Any) -> str | None:
    """None when ``value`` fits a field with this ``metadata``, else what would (``one of a, b`` / ``>= 0``)."""
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        return f"one of {', '.join(choices)}"
    bounds = metadata.get("bounds")
    if bounds is not None and not bounds.admits(value):
        return f"a finite number {bounds}" if isinstance(value, float) and not math.isfinite(value) else str(bounds)
    return None


def check_fields(obj: Any) -> None:
    """Raise ValueError naming the first field of dataclass ``obj`` whose value misses its choices or bounds."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for item in value if isinstance(value, list) else [value]:
            want = None if item is None else allowed(item, f.metadata)
            if want is not None:
                raise ValueError(f"{f.name} must be {want}, got {item!r}")


__all__ = ["Bounds", "allowed", "bounded", "check_fields", "choice"]

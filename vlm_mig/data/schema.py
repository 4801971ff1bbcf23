"""The one record every loader produces, and the error every loader raises."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Task types the graders know (see ``vlm_mig.rewards``).
TASK_TYPES = ("count", "math", "numeric", "mc", "text")


class DataError(ValueError):
    """Bad input data; the message names the file, line and field at fault."""


def where(path: Any, line: int | None = None, field_name: str | None = None) -> str:
    """Location prefix for error messages: ``file:line [field]``."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field_name:
        loc += f" [{field_name}]"
    return loc


@dataclass
class Sample:
    """One prompt with its reference answer.

    Either ``question`` (plain user text; the images, if any, are placed before it) or ``messages``
    (a chat list in the transformers format, ``{"type": "image"}`` parts marking where each image of
    ``images`` goes, in order) is set.
    """

    id: str
    answer: str
    task: str = "math"
    question: str | None = None
    messages: list[dict[str, Any]] | None = None
    images: list[str] = field(default_factory=list)
    answer_variants: list[str] = field(default_factory=list)
    gold_steps: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.question is None) == (self.messages is None):
            raise DataError(f"sample {self.id!r}: exactly one of 'question' or 'messages' must be set")
        if self.task not in TASK_TYPES:
            raise DataError(f"sample {self.id!r}: unknown task type {self.task!r}; expected one of {TASK_TYPES}")
        if not str(self.answer).strip():
            raise DataError(f"sample {self.id!r}: empty answer")
        self.answer = str(self.answer).strip()

    @property
    def variants(self) -> list[str]:
        """``V(y*)``: the gold answer first, then the distinct extra surface forms."""
        out = [self.answer]
        for v in self.answer_variants:
            if v not in out:
                out.append(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(**d)

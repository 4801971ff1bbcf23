"""Graded completions and the metrics of a benchmark and a suite: what results.json and samples.jsonl hold."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from vlm_mig.data.schema import TASK_TYPES, Sample
from vlm_mig.evaluation.passk import pass_at_k, pass_k_values
from vlm_mig.rewards import extract_answer, grade, is_well_formatted

#: Short name of each task type's grader (``vlm_mig.rewards.grade``), for reports.
GRADER_NAMES = {
    "math": "math-verify",
    "count": "integer-match",
    "numeric": "numeric-tolerance",
    "mc": "option-letter",
    "text": "normalized-text",
}
#: What each task type's grader does.
GRADERS = {
    "math": "math-verify (symbolic equivalence; exact LaTeX match short-cut)",
    "count": "integer match",
    "numeric": "numeric match: integer golds exactly, others |p - g| <= max(1e-6, 1e-4 |g|)",
    "mc": "option letter match",
    "text": "normalised string match",
}


@dataclass
class SampleRecord:
    """One graded completion: a line of samples.jsonl."""

    benchmark: str
    id: str  #: the item's id
    sample: int  #: completion index 0..K-1
    task: str  #: grader task type
    prompt: str  #: the chat-formatted prompt text (the question when no processor formatted it)
    completion: str
    extracted: str | None  #: the answer read from the completion (None: none given)
    gold: str
    correct: bool
    formatted: bool  #: ``<think>…</think><answer>…</answer>`` with a non-empty think span
    length: int  #: completion tokens through EOS (characters when no tokenizer was given)
    settings: str = ""  #: hash of model, decoding, template, extraction and item settings (resume key)
    images: list[str] = field(default_factory=list)
    gold_variants: list[str] = field(default_factory=list)
    time: str = ""  #: when it was written (UTC)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.benchmark, self.id, self.sample)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> SampleRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass
class BenchmarkResult:
    """Metrics of one benchmark, its settings, and every graded completion."""

    name: str
    n: int  #: items
    samples: int  #: completions per item (K)
    accuracy: float  #: mean correctness over all completions (= pass@1)
    format_rate: float  #: fraction of well-formatted completions
    mean_length: float  #: mean completion length (``length_unit``)
    pass_at_k: dict[int, float]
    answered_rate: float  #: fraction of completions with an extractable answer
    tasks: list[str]  #: task types of the items
    graders: dict[str, dict[str, str]]  #: per task type: name, description, version
    extraction: str
    model: str
    template: dict[str, Any]
    decoding: dict[str, Any]
    source: dict[str, Any]  #: where the items came from (registry source and its settings)
    timestamp: str
    length_unit: str = "tokens"
    records: list[SampleRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The results.json entry (records go to samples.jsonl, not here)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "records"}
        out["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        return out


def grader_info(task: str) -> dict[str, str]:
    """Name, description and version of the grader for ``task`` (math-verify's installed version for math)."""
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task type {task!r}")
    vlm_mig = dist_version("vlm-mig")
    return {
        "name": GRADER_NAMES[task],
        # math-verify does the math comparisons; the other graders are vlm_mig's own code.
        "version": dist_version("math-verify") if task == "math" else vlm_mig,
        "function": f"vlm_mig.rewards.grade(task={task!r})",
        "description": GRADERS[task],
        "vlm_mig": vlm_mig,
    }


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def grade_one(sample: Sample, completion: str, extraction: str = "strict") -> tuple[str | None, bool, bool]:
    """``(extracted answer, correct, well formatted)`` of one completion, exactly as training grades it."""
    extracted = extract_answer(completion, fallback=extraction == "fallback")
    correct = grade(extracted, sample.variants, sample.task)
    return extracted, correct, is_well_formatted(completion)


def summarize(
    name: str,
    samples: Sequence[Sample],
    records: Sequence[SampleRecord],
    num_samples: int,
    **meta: Any,
) -> BenchmarkResult:
    """Metrics over ``records`` (K per item, in item order) plus ``meta`` (settings for the report)."""
    by_item: dict[str, list[SampleRecord]] = {}
    for r in records:
        by_item.setdefault(r.id, []).append(r)
    ks = pass_k_values(num_samples)
    pass_k = {
        k: sum(pass_at_k(len(rs), sum(r.correct for r in rs), k) for rs in by_item.values()) / max(1, len(by_item))
        for k in ks
    }
    total = max(1, len(records))
    tasks = sorted({s.task for s in samples})
    return BenchmarkResult(
        name=name,
        n=len(samples),
        samples=num_samples,
        accuracy=sum(r.correct for r in records) / total,
        format_rate=sum(r.formatted for r in records) / total,
        mean_length=sum(r.length for r in records) / total,
        pass_at_k=pass_k,
        answered_rate=sum(r.extracted is not None for r in records) / total,
        tasks=tasks,
        graders={t: grader_info(t) for t in tasks},
        records=list(records),
        **meta,
    )


@dataclass
class SuiteResult:
    """Every benchmark's result, the skipped ones with their reasons, and the run's identity."""

    suite: str
    model: str
    results: dict[str, BenchmarkResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    suite_file: str | None = None
    started: str = field(default_factory=now_utc)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "suite_file": self.suite_file,
            "model": self.model,
            "started": self.started,
            "timestamp": now_utc(),
            "seconds": round(self.seconds, 2),
            "vlm_mig_version": dist_version("vlm-mig"),
            "benchmarks": {k: r.to_json() for k, r in self.results.items()},
            "skipped": dict(self.skipped),
        }

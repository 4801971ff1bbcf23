"""The benchmark registry: the evaluation files shipped in the repository's ``datasets/`` folder.

``load_benchmark("gsm8k")`` returns :class:`~vlm_mig.data.schema.Sample` objects with the gold
answer each benchmark's protocol defines (see ``datasets/README.md`` for provenance). The folder is
found next to the package (editable install or source checkout); ``VLM_MIG_DATASETS`` or the
``datasets_dir`` argument point elsewhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_mig.data.loaders import SampleList, _answer_text, _make_sample, _text_field, read_jsonl_samples
from vlm_mig.data.schema import DataError, Sample
from vlm_mig.prompts import last_boxed

#: Environment variable that overrides where the benchmark folder is.
DATASETS_ENV = "VLM_MIG_DATASETS"

_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")


def gsm8k_gold(answer: str) -> tuple[str, list[str]]:
    """GSM8K rationale -> (number after ``####`` without commas, rationale lines without ``<<...>>``)."""
    rationale, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("no '####' final answer")
    steps = [_CALC_ANNOTATION.sub("", line).strip() for line in rationale.splitlines()]
    return final.strip().replace(",", ""), [s for s in steps if s]


# --------------------------------------------------------------------------------------------
# Row converters: record -> Sample, one per benchmark
# --------------------------------------------------------------------------------------------


def _base(name: str, record: dict[str, Any], line_no: int, native_id: str | None) -> dict[str, Any]:
    # Native ids (AIME's problem number, SVAMP's ID) keep results joinable with other harnesses.
    rid = record.get(native_id) if native_id else None
    return {"id": f"{name}-{rid if rid is not None else line_no - 1}", "meta": {"benchmark": name}}


def _math500(record: dict[str, Any], loc: str, line_no: int) -> Sample:
    base = _base("math500", record, line_no, None)
    base["meta"].update({k: record.get(k) for k in ("solution", "subject", "level")})
    return _make_sample(
        loc,
        **base,
        task="math",
        question=_text_field(record.get("problem"), loc, "problem"),
        answer=_answer_text(record.get("answer"), loc, "answer"),
    )


def _gsm8k(record: dict[str, Any], loc: str, line_no: int) -> Sample:
    try:
        gold, steps = gsm8k_gold(_text_field(record.get("answer"), loc, "answer"))
    except ValueError as err:
        raise DataError(f"{loc} [answer]: {err}") from None
    return _make_sample(
        loc,
        **_base("gsm8k", record, line_no, None),
        task="numeric",
        question=_text_field(record.get("question"), loc, "question"),
        answer=_answer_text(gold, loc, "answer"),
        gold_steps=steps or None,
    )


def _svamp(record: dict[str, Any], loc: str, line_no: int) -> Sample:
    body = _text_field(record.get("Body"), loc, "Body").strip()
    question = _text_field(record.get("Question"), loc, "Question").strip()
    base = _base("svamp", record, line_no, "ID")
    base["meta"].update({k: record.get(k) for k in ("Equation", "Type")})
    return _make_sample(
        loc,
        **base,
        task="numeric",
        question=f"{body} {question}",
        answer=_answer_text(record.get("Answer"), loc, "Answer"),
    )


def _competition(name: str) -> Callable[[dict[str, Any], str, int], Sample]:
    """AIME24 and AMC23 share a layout: ``id``, ``problem``, ``answer`` (AMC's is a float)."""

    def convert(record: dict[str, Any], loc: str, line_no: int) -> Sample:
        base = _base(name, record, line_no, "id")
        if record.get("url"):
            base["meta"]["url"] = record["url"]
        return _make_sample(
            loc,
            **base,
            task="math",
            question=_text_field(record.get("problem"), loc, "problem"),
            answer=_answer_text(record.get("answer"), loc, "answer"),
        )

    return convert


def _minerva(record: dict[str, Any], loc: str, line_no: int) -> Sample:
    solution = _text_field(record.get("solution"), loc, "solution")
    gold = last_boxed(solution)
    if gold is None:
        raise DataError(f"{loc} [solution]: no balanced \\boxed{{...}} answer")
    base = _base("minerva_math", record, line_no, "idx")
    base["meta"].update({"solution": solution, "type": record.get("type")})
    return _make_sample(
        loc,
        **base,
        task="math",
        question=_text_field(record.get("problem"), loc, "problem"),
        answer=_answer_text(gold, loc, "solution"),
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """One shipped benchmark: its file under ``datasets/``, task type, row count and converter."""

    name: str
    file: str
    task: str
    rows: int
    convert: Callable[[dict[str, Any], str, int], Sample]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("math500", "math500/test.jsonl", "math", 500, _math500),
        Benchmark("gsm8k", "gsm8k/test.jsonl", "numeric", 1319, _gsm8k),
        Benchmark("svamp", "svamp/test.jsonl", "numeric", 1000, _svamp),
        Benchmark("aime24", "aime24/test.jsonl", "math", 30, _competition("aime24")),
        Benchmark("amc23", "amc23/test.jsonl", "math", 40, _competition("amc23")),
        Benchmark("minerva_math", "minerva_math/test.jsonl", "math", 272, _minerva),
    )
}

_ALIASES = {"math_500": "math500", "minerva": "minerva_math"}


def list_benchmarks() -> list[str]:
    """Names accepted by :func:`load_benchmark`."""
    return list(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    """Look a benchmark up by name, case- and dash-insensitively (``MATH-500`` -> ``math500``)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def find_datasets_dir(override: str | os.PathLike | None = None) -> Path:
    """The folder holding the shipped benchmark files.

    Order: ``override``, then ``$VLM_MIG_DATASETS``, then ``datasets/`` at the repository root
    (two levels above this package, which is where it is in a checkout or an editable install).
    """
    chosen = override if override is not None else os.environ.get(DATASETS_ENV)
    path = Path(chosen) if chosen else Path(__file__).resolve().parents[2] / "datasets"
    if not path.is_dir():
        raise DataError(
            f"benchmark folder not found: {path}. The benchmark files ship in the repository's datasets/ "
            f"folder (not in a wheel): run from a checkout or editable install, set {DATASETS_ENV}, "
            "or pass datasets_dir="
        )
    return path


def load_benchmark(
    name: str, limit: int | None = None, *, datasets_dir: str | os.PathLike | None = None
) -> SampleList:
    """Load a shipped benchmark (see :func:`list_benchmarks`) as Samples with protocol gold answers.

    MATH500 and AIME24: ``answer``; AMC23: ``answer`` as an integer string (``27.0 -> "27"``);
    Minerva: the last ``\\boxed{}`` of ``solution``; GSM8K: the number after ``####`` (commas
    removed; rationale lines kept as ``gold_steps``); SVAMP: ``Answer`` for ``Body + " " + Question``.
    ``limit`` keeps the first rows. Any bad row raises :class:`DataError` naming file and line.
    """
    bench = get_benchmark(name)
    path = find_datasets_dir(datasets_dir) / bench.file
    if not path.is_file():
        raise DataError(f"benchmark file missing: {path}")
    return read_jsonl_samples(path, bench.convert, limit=limit)

"""The evaluation harness: benchmarks -> batched generation -> grading -> metrics -> reports.

Three layers, each usable on its own:

* :func:`evaluate` (in process, no files unless given a :class:`SampleStore`): one benchmark (a
  registry name, a :class:`~vlm_mig.data.suites.BenchmarkSpec` or a list of ``Sample``) on a loaded
  model, returning a :class:`BenchmarkResult` (accuracy, format rate, mean length, pass@k, one
  :class:`SampleRecord` per completion). The trainer's in-loop validation calls it.
  :func:`grade_completions` grades given completions the same way without generating (e.g. the
  reference solutions, or completions from another engine).
* :func:`run_suite`: several benchmarks with per-benchmark options; a benchmark that needs images on a
  text-only model is skipped with its reason. With ``out_dir`` it appends every finished batch to
  ``samples.jsonl`` (so an interrupted run resumes without regenerating) and rewrites
  ``results.json`` and ``results.md`` after each benchmark.
* :func:`add_eval_command`: the ``vlm-mig eval`` subcommand.

Decoding: one greedy completion per item by default (pass@1 = accuracy). With ``samples=K > 1`` it
samples K completions per item (temperature 0.6, top-p 0.95 unless set), each from its own seeded
stream (``vlm_mig.rollout.sampling``, seeded by run seed, benchmark and item id), so a resumed run
redraws what it lost instead of other samples; pass@k uses the unbiased estimator of Chen et al.
(2021), ``1 - C(n-c, k) / C(n, k)``, averaged over items.

Grading is ``vlm_mig.rewards``: the answer is the text of the last ``<answer>…</answer>`` (narrowed to
its ``\\boxed{}``), graded by task type; the format check is the training reward's. Untagged answers
score 0 by default (``extraction="strict"``, as in training); ``extraction="fallback"`` also reads a
final ``\\boxed{}`` or number.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from vlm_mig.data.schema import TASK_TYPES, DataError, Sample
from vlm_mig.data.suites import SOURCES, BenchmarkSpec, load_eval_samples, spec_from_mapping
from vlm_mig.processing import PromptTemplate, is_processor, tokenizer_of
from vlm_mig.prompts import SYSTEM_PROMPT, format_solution
from vlm_mig.rewards import extract_answer, grade, is_well_formatted

#: Environment variable naming another folder of suite files.
SUITES_ENV = "VLM_MIG_EVAL_SUITES"
#: Sampling defaults when K > 1 (the DeepSeek-R1 evaluation setting); K = 1 is greedy.
SAMPLING_TEMPERATURE = 0.6
SAMPLING_TOP_P = 0.95
EXTRACTIONS = ("strict", "fallback")

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


class ImagesRequired(DataError):
    """A benchmark shows images but the model is text-only."""


# ----------------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"): the probability that at
    least one of ``k`` samples drawn without replacement from the ``n`` is correct. Python integers
    are exact, so the ratio is computed without overflow or cancellation.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_k_values(num_samples: int) -> list[int]:
    """The k reported for K samples: 1, the powers of two below K, and K."""
    ks = {1, num_samples}
    k = 2
    while k < num_samples:
        ks.add(k)
        k *= 2
    return sorted(ks)


# ----------------------------------------------------------------------------------------------
# Options, decoding, templates
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """Resolved decoding settings (recorded in results.json and part of the resume key)."""

    samples: int  #: K completions per item
    temperature: float  #: 0 = greedy
    top_p: float
    max_new_tokens: int

    @property
    def mode(self) -> str:
        return "greedy" if self.temperature == 0 else "sampling"

    @classmethod
    def resolve(cls, samples: int, temperature: float | None, top_p: float | None, max_new_tokens: int) -> Decoding:
        """Greedy for one sample, seeded sampling for K > 1, unless ``temperature`` says otherwise."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature is None:
            temperature = 0.0 if samples == 1 else SAMPLING_TEMPERATURE
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0 and samples > 1:
            raise ValueError(f"{samples} greedy samples would be identical: set temperature > 0 for pass@k")
        if top_p is None:
            top_p = 1.0 if temperature == 0 else SAMPLING_TOP_P
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return cls(samples, float(temperature), float(top_p), int(max_new_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, **dataclasses.asdict(self)}


def parse_template(value: Any, where: str = "template") -> PromptTemplate:
    """``default`` (the training prompt), ``r1v``, ``chat`` (no system prompt, no suffix), or a mapping
    ``{system_prompt, question_suffix}`` where ``system_prompt: default`` is the project's prompt."""
    if isinstance(value, PromptTemplate):
        return value
    if value == "default":
        return PromptTemplate()
    if value == "r1v":
        return PromptTemplate.r1v()
    if value == "chat":
        return PromptTemplate(system_prompt=None)
    if isinstance(value, dict):
        unknown = set(value) - {"system_prompt", "question_suffix"}
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; expected system_prompt, question_suffix")
        system = value.get("system_prompt", "default")
        return PromptTemplate(
            system_prompt=SYSTEM_PROMPT if system == "default" else system,
            question_suffix=str(value.get("question_suffix") or ""),
        )
    raise DataError(
        f"{where}: expected default, r1v, chat or a mapping {{system_prompt, question_suffix}}, got {value!r}"
    )


def describe_template(template: PromptTemplate) -> dict[str, Any]:
    """The template as recorded in results.json, naming the known presets."""
    preset = {
        "default": PromptTemplate(),
        "r1v": PromptTemplate.r1v(),
        "chat": PromptTemplate(system_prompt=None),
    }
    name = next((k for k, t in preset.items() if t == template), "custom")
    return {"name": name, "system_prompt": template.system_prompt, "question_suffix": template.question_suffix}


def template_from_run_config(model_dir: str | os.PathLike) -> PromptTemplate | None:
    """The prompt a checkpoint was trained with, from the ``run_config.json`` the trainer saves next to
    the weights (``data.system_prompt`` / ``data.question_suffix``); None when there is none.

    This is what keeps train-time and eval-time prompts the same without the user repeating them.
    """
    path = Path(model_dir) / "run_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text()).get("data") or {}
    except (json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{path}: cannot read the training config: {e}") from None
    if "system_prompt" not in data and "question_suffix" not in data:
        return None
    return parse_template(
        {"system_prompt": data.get("system_prompt", "default"), "question_suffix": data.get("question_suffix", "")},
        str(path),
    )


@dataclass
class EvalOptions:
    """Per-benchmark evaluation options (suite ``defaults``, a benchmark entry and CLI flags set them)."""

    samples: int = 1  #: K completions per item (1: greedy pass@1)
    temperature: float | None = None  #: None: 0 for K = 1, 0.6 for K > 1
    top_p: float | None = None  #: None: 1 for greedy, 0.95 for sampling
    max_new_tokens: int = 1024  #: completion budget (SPEC's max completion)
    batch_size: int = 16  #: prompts per generate call (each with K completions)
    limit: int | None = None  #: first N items of each benchmark
    seed: int = 0  #: sampling seed (each item's stream derives from it, its benchmark and id)
    extraction: str = "strict"  #: strict (tagged answers only, as the training reward) | fallback
    template: PromptTemplate | None = None  #: None: the model's training prompt if saved, else PromptTemplate()

    def updated(self, changes: dict[str, Any], where: str) -> EvalOptions:
        """A copy with ``changes`` applied; unknown keys and bad values are errors naming ``where``."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise DataError(f"{where}: unknown option(s) {unknown}; options are {names}")
        changes = dict(changes)
        if changes.get("template") is not None:
            changes["template"] = parse_template(changes["template"], f"{where}.template")
        if changes.get("extraction") is not None and changes["extraction"] not in EXTRACTIONS:
            raise DataError(f"{where}.extraction: expected one of {EXTRACTIONS}, got {changes['extraction']!r}")
        for key in ("samples", "max_new_tokens", "batch_size", "limit", "seed"):
            value = changes.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise DataError(f"{where}.{key}: expected an integer, got {value!r}")
            if value is not None and key != "seed" and value < 1:
                raise DataError(f"{where}.{key}: must be >= 1, got {value}")
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Records and results
# ----------------------------------------------------------------------------------------------


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
    vlm_mig = _version("vlm-mig")
    return {
        "name": GRADER_NAMES[task],
        # math-verify does the math comparisons; the other graders are vlm_mig's own code.
        "version": _version("math-verify") if task == "math" else vlm_mig,
        "function": f"vlm_mig.rewards.grade(task={task!r})",
        "description": GRADERS[task],
        "vlm_mig": vlm_mig,
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _now() -> str:
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


# ----------------------------------------------------------------------------------------------
# samples.jsonl: append per batch, resume after an interruption
# ----------------------------------------------------------------------------------------------


class SampleStore:
    """``samples.jsonl`` as an append-only log of graded completions, keyed by (benchmark, id, sample).

    Every finished batch is appended and flushed (and fsynced), so an interruption loses at most the
    batch in flight. On open, a torn last line (no newline, or not JSON: the write was cut) is dropped
    and the file truncated to the last whole line; a bad line elsewhere is an error naming it, since
    that is not what an interruption leaves.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[tuple[str, str, int], SampleRecord] = {}
        self.dropped_torn_line = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1
            if last and not raw:
                break  # the file ends with a newline
            if not last and not raw.strip():
                good_end += len(raw) + 1
                continue
            try:
                record = SampleRecord.from_json(json.loads(raw))
            except (ValueError, TypeError, AttributeError) as e:  # JSON, UTF-8, or not a record's fields
                if last or (i == len(lines) - 2 and not lines[-1]):
                    self._truncate(good_end)
                    return
                raise DataError(f"{self.path}:{i + 1}: corrupt line (not from an interrupted write): {e}") from None
            if last:  # parsed, but the newline never made it: rewrite it whole on the next append
                self._truncate(good_end)
                return
            self.records[record.key] = record
            good_end += len(raw) + 1

    def _truncate(self, size: int) -> None:
        self.dropped_torn_line = True
        with open(self.path, "r+b") as f:
            f.truncate(size)

    def done(self, benchmark: str, settings: str, describe: str = "") -> dict[tuple[str, int], SampleRecord]:
        """Finished completions of ``benchmark`` made with these settings; other settings are an error.

        Mixing completions of two models or two decodings under one benchmark name would give a
        meaningless score, so a mismatch stops the run instead of being silently overwritten.
        """
        mine = {k: r for k, r in self.records.items() if k[0] == benchmark}
        stale = [r for r in mine.values() if r.settings != settings]
        if stale:
            raise DataError(
                f"{self.path}: {len(stale)} completion(s) of benchmark {benchmark!r} were made with other settings "
                f"(model, decoding, prompt template, extraction or items differ from {describe or settings}); "
                "use another --out, or delete that file to start over"
            )
        return {(r.id, r.sample): r for r in mine.values()}

    def append(self, records: Iterable[SampleRecord]) -> None:
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r.key] = r


# ----------------------------------------------------------------------------------------------
# evaluate: one benchmark in process
# ----------------------------------------------------------------------------------------------


def resolve_benchmark(
    benchmark: str | BenchmarkSpec | Sequence[Sample],
    *,
    name: str | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    multimodal: bool = True,
) -> tuple[str, dict[str, Any], list[Sample]]:
    """``(name, source description, items)``; a benchmark with images on a text-only model raises
    :class:`ImagesRequired` before any item is loaded or drawn when the registry knows it shows images."""
    if isinstance(benchmark, (str, BenchmarkSpec)):
        spec = benchmark if isinstance(benchmark, BenchmarkSpec) else BenchmarkSpec(name=benchmark)
        name = name or spec.name
        if not multimodal and spec.entry.needs_images:
            raise ImagesRequired(_images_message(name))
        samples = load_eval_samples(spec, limit, cache_dir)
        source = spec.describe()
    else:
        samples = list(benchmark)[:limit] if limit is not None else list(benchmark)
        name = name or "samples"
        source = {"source": "samples"}
    if not samples:
        raise DataError(f"benchmark {name!r}: no items")
    if not multimodal and any(s.images for s in samples):
        raise ImagesRequired(_images_message(name))
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"benchmark {name!r}: duplicate item id {s.id!r} (ids key the results)")
        seen.add(s.id)
    return name, source, samples


def _images_message(name: str) -> str:
    return (
        f"benchmark {name!r} shows images, but the model is text-only (its processor has no image processor); "
        "evaluate it with a vision-language model"
    )


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_name(model: Any) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))


def evaluate(
    model: Any,
    processor: Any,
    benchmark: str | BenchmarkSpec | Sequence[Sample],
    *,
    samples_k: int = 1,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 1024,
    temperature: float | None = None,
    top_p: float | None = None,
    template: PromptTemplate | None = None,
    extraction: str = "strict",
    seed: int = 0,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    store: SampleStore | None = None,
    name: str | None = None,
    model_name: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> BenchmarkResult:
    """Generate, grade and score one benchmark on a loaded model.

    ``benchmark``: a registry name (``gsm8k``, ``clevr_cogen_b``, ...), a ``BenchmarkSpec`` or a list
    of ``Sample``. ``samples_k = 1`` is greedy unless ``temperature > 0``; K > 1 samples K completions per
    item from per-item seeded streams. ``template`` defaults to ``PromptTemplate()`` (the training
    prompt). With a ``store``, completions already in it are reused and new ones are appended per
    batch. The model is put in eval mode for generation and restored afterwards. ``min_pixels`` /
    ``max_pixels`` size images as at training time (the trainer passes its rollout settings).
    """
    from tqdm.auto import tqdm

    from vlm_mig.rollout import RolloutConfig, make_engine
    from vlm_mig.rollout.sampling import rollout_seed

    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {EXTRACTIONS}, got {extraction!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    decoding = Decoding.resolve(samples_k, temperature, top_p, max_new_tokens)
    template = template or PromptTemplate()
    name, source, samples = resolve_benchmark(
        benchmark, name=name, limit=limit, cache_dir=cache_dir, multimodal=is_processor(processor)
    )
    model_name = model_name or _model_name(model)
    settings = {
        "model": model_name,
        "decoding": decoding.to_dict(),
        "template": describe_template(template),
        "extraction": extraction,
        "source": source,
        "seed": seed if decoding.mode == "sampling" else None,
    }
    key = _settings_hash(settings)
    done = store.done(name, key, json.dumps(settings, default=str)) if store is not None else {}
    K = decoding.samples
    # An item is pending if any of its K completions is missing (a torn batch can cut an item's K
    # rows); it is redrawn whole from the same seeded streams and only the missing completions are kept.
    pending = [s for s in samples if any((s.id, j) not in done for j in range(K))]
    engine = make_engine(
        RolloutConfig(
            num_generations=K,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            max_new_tokens=decoding.max_new_tokens,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        ),
        model,
        processor,
        template,
    )
    have = sum((s.id, j) in done for s in samples for j in range(K))
    records = dict(done)
    with tqdm(total=len(samples) * K, initial=have, desc=name, unit="completion", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            seeds = [rollout_seed(seed, name, s.id) for s in batch] if decoding.mode == "sampling" else None
            rollouts = engine.generate(batch, seeds=seeds)
            new = _records_of(name, key, batch, rollouts, K, extraction, done)
            if store is not None:
                store.append(new)
            for r in new:
                records[(r.id, r.sample)] = r
            bar.update(len(new))
    ordered = [records[(s.id, j)] for s in samples for j in range(K)]
    return summarize(
        name, samples, ordered, K,
        extraction=extraction, model=model_name, template=describe_template(template),
        decoding=decoding.to_dict(), source=source, timestamp=_now(),
    )  # fmt: skip


def _records_of(
    name: str,
    settings: str,
    batch: list[Sample],
    rollouts: Any,
    K: int,
    extraction: str,
    done: dict[tuple[str, int], SampleRecord],
) -> list[SampleRecord]:
    """Grade one generated batch into records, skipping completions already stored."""
    lengths = rollouts.completion_lengths.tolist()
    now = _now()
    out = []
    for row, text in enumerate(rollouts.texts):
        i, j = divmod(row, K)
        sample = batch[i]
        if (sample.id, j) in done:
            continue
        extracted, correct, formatted = grade_one(sample, text, extraction)
        out.append(
            SampleRecord(
                benchmark=name, id=sample.id, sample=j, task=sample.task, prompt=rollouts.prompts.texts[i],
                completion=text, extracted=extracted, gold=sample.answer, correct=correct, formatted=formatted,
                length=int(lengths[row]), settings=settings, images=list(sample.images),
                gold_variants=sample.variants[1:], time=now,
            )
        )  # fmt: skip
    return out


def gold_completion(sample: Sample) -> str:
    """The reference solution of an item as a completion: the benchmark's own worked solution when it
    ships one (MATH500, Minerva: graded through their last ``\\boxed{}``), else the gold steps in the
    training format, else just ``<answer>gold</answer>``."""
    solution = sample.meta.get("solution")
    if isinstance(solution, str) and solution.strip():
        return solution
    if sample.gold_steps:
        return format_solution(sample.gold_steps, sample.answer)
    return f"<answer>{sample.answer}</answer>"


def grade_completions(
    benchmark: str | BenchmarkSpec | Sequence[Sample],
    completions: Sequence[str] | dict[str, str] | None = None,
    *,
    extraction: str = "fallback",
    tokenizer: Any = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    name: str | None = None,
    model_name: str = "gold",
    store: SampleStore | None = None,
) -> BenchmarkResult:
    """Grade given completions (one per item, in item order or by id) without generating.

    ``completions=None`` grades each item's reference solution (:func:`gold_completion`): a check that
    the gold answers, the extraction and the grader agree (MATH500 scores 100%). ``extraction`` defaults
    to ``fallback`` because reference solutions are not in the tagged format. Lengths are tokens with a
    ``tokenizer`` (or processor), else characters.
    """
    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {EXTRACTIONS}, got {extraction!r}")
    name, source, samples = resolve_benchmark(benchmark, name=name, limit=limit, cache_dir=cache_dir)
    if completions is None:
        texts = [gold_completion(s) for s in samples]
    elif isinstance(completions, dict):
        missing = [s.id for s in samples if s.id not in completions]
        if missing:
            raise DataError(f"benchmark {name!r}: no completion for {len(missing)} item(s), e.g. {missing[:3]}")
        texts = [completions[s.id] for s in samples]
    else:
        texts = list(completions)
        if len(texts) != len(samples):
            raise DataError(f"benchmark {name!r}: {len(texts)} completions for {len(samples)} items")
    tok = tokenizer_of(tokenizer) if tokenizer is not None else None
    settings = {"model": model_name, "extraction": extraction, "source": source, "completions": "given"}
    key = _settings_hash(settings)
    now = _now()
    records = []
    for s, text in zip(samples, texts):
        extracted, correct, formatted = grade_one(s, text, extraction)
        length = len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else len(text)
        records.append(
            SampleRecord(
                benchmark=name, id=s.id, sample=0, task=s.task, prompt=s.question or json.dumps(s.messages),
                completion=text, extracted=extracted, gold=s.answer, correct=correct, formatted=formatted,
                length=length, settings=key, images=list(s.images), gold_variants=s.variants[1:], time=now,
            )
        )  # fmt: skip
    if store is not None:
        store.done(name, key)  # refuses to mix with generated completions under the same name
        store.append(r for r in records if (r.benchmark, r.id, r.sample) not in store.records)
    return summarize(
        name, samples, records, 1,
        extraction=extraction, model=model_name, template={"name": "none"}, decoding={"mode": "given"},
        source=source, timestamp=now, length_unit="tokens" if tok is not None else "characters",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------


@dataclass
class Suite:
    """A named list of benchmarks with shared and per-benchmark options (an ``eval/*.yaml`` file)."""

    name: str
    benchmarks: list[BenchmarkSpec]
    defaults: dict[str, Any] = field(default_factory=dict)  #: EvalOptions fields for every benchmark
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  #: per benchmark name
    description: str = ""
    path: str | None = None

    def options_for(self, name: str, base: EvalOptions, forced: dict[str, Any] | None = None) -> EvalOptions:
        """``base`` < suite defaults < the benchmark's own options < ``forced`` (CLI flags)."""
        where = self.path or self.name
        opts = base.updated(self.defaults, f"{where}: defaults")
        opts = opts.updated(self.overrides.get(name, {}), f"{where}: {name}")
        return opts.updated(forced or {}, "command line")


def suites_dir() -> Path:
    """``$VLM_MIG_EVAL_SUITES``, else ``eval/`` at the repository root (next to the package)."""
    env = os.environ.get(SUITES_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "eval"


def find_suite(name_or_path: str | os.PathLike) -> Path:
    """A suite file: an existing path, else ``eval/NAME.yaml``."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    candidate = suites_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in suites_dir().glob("*.yaml")) if suites_dir().is_dir() else []
    raise DataError(f"suite {str(name_or_path)!r} not found: not a file, nor {candidate}; known suites: {known}")


_OPTION_KEYS = {f.name for f in dataclasses.fields(EvalOptions)}


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """Parse a suite YAML file (see ``eval/README.md``); errors name the file and the entry."""
    path = find_suite(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or not data["benchmarks"]:
        raise DataError(f"{path}: a suite is a mapping with a non-empty 'benchmarks' list")
    unknown = sorted(set(data) - {"name", "description", "defaults", "benchmarks"})
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; expected name, description, defaults, benchmarks")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise DataError(f"{path}: 'defaults' must be a mapping of options")
    EvalOptions().updated(defaults, f"{path}: defaults")  # validate early, before any model loads
    specs, overrides = [], {}
    for i, entry in enumerate(data["benchmarks"]):
        where = f"{path}: benchmarks[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a benchmark name or a mapping")
        opts = {k: v for k, v in entry.items() if k in _OPTION_KEYS}
        spec = spec_from_mapping({k: v for k, v in entry.items() if k not in _OPTION_KEYS}, where, path.parent)
        if spec.name in overrides:
            raise DataError(f"{where}: benchmark name {spec.name!r} appears twice")
        EvalOptions().updated(opts, where)
        specs.append(spec)
        overrides[spec.name] = opts
    return Suite(
        name=str(data.get("name") or path.stem),
        benchmarks=specs,
        defaults=defaults,
        overrides=overrides,
        description=str(data.get("description") or "").strip(),
        path=str(path),
    )


@dataclass
class SuiteResult:
    """Every benchmark's result, the skipped ones with their reasons, and the run's identity."""

    suite: str
    model: str
    results: dict[str, BenchmarkResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    suite_file: str | None = None
    started: str = field(default_factory=_now)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "suite_file": self.suite_file,
            "model": self.model,
            "started": self.started,
            "timestamp": _now(),
            "seconds": round(self.seconds, 2),
            "vlm_mig_version": _version("vlm-mig"),
            "benchmarks": {k: r.to_json() for k, r in self.results.items()},
            "skipped": dict(self.skipped),
        }


def run_suite(
    model: Any,
    processor: Any,
    suite: Suite,
    options: EvalOptions | None = None,
    *,
    forced: dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    gold: bool = False,
    strict_images: bool = False,
    progress: bool = True,
    log: TextIO | None = None,
) -> SuiteResult:
    """Evaluate every benchmark of ``suite``; with ``out_dir``, resumable and reported on disk.

    ``options`` are the base options, ``forced`` the ones that win over the suite (CLI flags). A
    benchmark that shows images on a text-only model is skipped with its reason (printed to ``log``)
    unless ``strict_images``, where it raises :class:`ImagesRequired`. ``gold=True`` grades the
    reference solutions instead of generating (no model needed). Synthetic image sets are drawn into
    ``cache_dir`` (default ``out_dir/cache``, else a temporary folder).
    """
    log = log if log is not None else sys.stderr
    base = options or EvalOptions()
    out = Path(out_dir) if out_dir is not None else None
    store = SampleStore(out / "samples.jsonl") if out is not None else None
    if store is not None and store.dropped_torn_line:
        print(f"note: dropped a torn last line of {store.path} (interrupted write); it is regenerated", file=log)
    if cache_dir is None and out is not None:
        cache_dir = out / "cache"
    multimodal = gold or is_processor(processor)
    name = "gold" if gold else (model_name or _model_name(model))
    result = SuiteResult(suite=suite.name, model=name, suite_file=suite.path)
    t0 = time.perf_counter()
    for spec in suite.benchmarks:
        opts = suite.options_for(spec.name, base, forced)
        if not multimodal and spec.entry.needs_images:
            _skip(result, spec.name, _images_message(spec.name), strict_images, log)
            continue
        try:
            if gold:
                res = grade_completions(spec, limit=opts.limit, cache_dir=cache_dir, tokenizer=processor, store=store)
            else:
                res = evaluate(
                    model, processor, spec,
                    samples_k=opts.samples, limit=opts.limit, batch_size=opts.batch_size,
                    max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                    template=opts.template, extraction=opts.extraction, seed=opts.seed,
                    progress=progress, cache_dir=cache_dir, store=store, model_name=name,
                )  # fmt: skip
        except ImagesRequired as e:  # a user jsonl whose rows turned out to have images
            _skip(result, spec.name, str(e), strict_images, log)
            continue
        result.results[spec.name] = res
        result.seconds = time.perf_counter() - t0
        if out is not None:
            write_reports(result, out)
    result.seconds = time.perf_counter() - t0
    if out is not None:
        write_reports(result, out)
    return result


def _skip(result: SuiteResult, name: str, reason: str, strict: bool, log: TextIO) -> None:
    if strict:
        raise ImagesRequired(reason)
    result.skipped[name] = reason
    print(f"skipped: {reason}", file=log)


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_table(result: SuiteResult) -> str:
    """The results as a markdown table (percentages), with the settings and the skipped benchmarks."""
    ks = sorted({k for r in result.results.values() for k in r.pass_at_k if k > 1})
    head = ["benchmark", "task", "n", "K", "accuracy", *[f"pass@{k}" for k in ks], "format", "answered",
            "mean length", "grader"]  # fmt: skip
    lines = [
        f"# Evaluation: {result.model}",
        "",
        f"Suite `{result.suite}`" + (f" ({result.suite_file})" if result.suite_file else "") + f", {_now()}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in result.results.values():
        graders = ", ".join(f"{g['name']} {g['version']}" for g in r.graders.values())
        row = [r.name, "/".join(r.tasks), str(r.n), str(r.samples), _fmt_pct(r.accuracy),
               *[_fmt_pct(r.pass_at_k[k]) if k in r.pass_at_k else "-" for k in ks],
               _fmt_pct(r.format_rate), _fmt_pct(r.answered_rate), f"{r.mean_length:.1f} {r.length_unit}", graders]
        lines.append("| " + " | ".join(row) + " |")  # fmt: skip
    lines.append("")
    lines.append("Accuracy, pass@k, format and answered are percentages; accuracy is pass@1 over all K completions.")
    for r in result.results.values():
        d = r.decoding
        decoding = "given completions"
        if d.get("mode") != "given":
            decoding = (
                f"{d['mode']}, temperature {d['temperature']}, top_p {d['top_p']}, "
                f"max_new_tokens {d['max_new_tokens']}"
            )
        lines.append(f"- `{r.name}`: {decoding}; prompt template `{r.template.get('name')}`; extraction {r.extraction}")
    if result.skipped:
        lines.append("")
        lines.append("Skipped:")
        lines.extend(f"- `{k}`: {v}" for k, v in result.skipped.items())
    return "\n".join(lines) + "\n"


def write_reports(result: SuiteResult, out_dir: str | os.PathLike) -> None:
    """Write ``results.json`` and ``results.md`` (each atomically: a reader never sees half a file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.json", json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out / "results.md", markdown_table(result))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# vlm-mig eval
# ----------------------------------------------------------------------------------------------


def add_eval_command(subparsers: Any) -> None:
    """Add the ``eval`` subcommand (its handler returns the exit code) to a ``vlm-mig`` subparsers object."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on benchmark suites (pass@1 / pass@k, results.json, samples.jsonl, results.md)",
        description="Zero-shot evaluation. Interrupted runs resume from OUT/samples.jsonl.",
    )
    p.add_argument("--model", help="model folder or hub id (not needed with --gold or --list)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--suite", help="suite name (eval/NAME.yaml: ood, superclevr, clevr) or a YAML path")
    which.add_argument(
        "--task",
        help="one benchmark: a registry name (gsm8k, superclevr, clevr_cogen_b, arithmetic, ...) or a task type "
        "(count, math, numeric, mc, text) for the jsonl in --data",
    )
    which.add_argument("--list", action="store_true", help="list the benchmark registry and the suites, then exit")
    p.add_argument("--data", help="local data of a benchmark that reads one (superclevr folder, a user jsonl)")
    p.add_argument("--format", default=None, help="how to read --data: auto | jsonl | r1v | superclevr")
    p.add_argument("--limit", type=int, help="first N items of each benchmark")
    p.add_argument("--samples", type=int, help="K completions per item (default 1: greedy); K > 1 reports pass@k")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0 for K = 1, 0.6 for K > 1)")
    p.add_argument("--top-p", type=float, help="nucleus threshold (default 1 greedy, 0.95 sampling)")
    p.add_argument("--max-new-tokens", type=int, help="completion budget (default 1024)")
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default 16)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--template", help="prompt: default | r1v | chat (default: the checkpoint's training prompt, "
                   "read from its run_config.json, else default)")
    p.add_argument("--extraction", choices=EXTRACTIONS, help="strict: tagged answers only (default); fallback")
    p.add_argument("--gold", action="store_true", help="grade the reference solutions instead of a model")
    p.add_argument("--out", help="output folder (default eval_out/<model>/<suite or task>)")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    """Handler of ``vlm-mig eval``: 0 on success, 1 when every benchmark was skipped, 2 on bad input."""
    try:
        return _eval_command(args)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _eval_command(args: argparse.Namespace) -> int:
    if args.list:
        print(describe_registry())
        return 0
    if not args.suite and not args.task:
        raise DataError("give --suite NAME_OR_PATH or --task NAME (or --list)")
    if not args.model and not args.gold:
        raise DataError("--model is required (or --gold to grade the reference solutions)")
    suite, strict = _suite_of(args)
    forced = {
        k: v
        for k, v in {
            "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "limit": args.limit,
            "seed": args.seed, "extraction": args.extraction, "template": args.template,
        }.items()
        if v is not None
    }  # fmt: skip
    suite.options_for(suite.benchmarks[0].name, EvalOptions(), forced)  # validate flags before loading a model
    model = processor = None
    base = EvalOptions()
    if args.gold:
        # Grading reference solutions needs no weights; the tokenizer (if given) only measures lengths.
        processor = _load_processor(args.model) if args.model else None
        model_label = "gold"
    else:
        model, processor, model_label = _load(args)
        if Path(args.model).is_dir():
            base = dataclasses.replace(base, template=template_from_run_config(args.model))
    out = Path(args.out) if args.out else Path("eval_out") / Path(model_label).name / suite.name
    t0 = time.perf_counter()
    result = run_suite(
        model, processor, suite, base, forced=forced, out_dir=out, model_name=model_label, gold=args.gold,
        strict_images=strict, progress=not args.no_progress,
    )
    print(markdown_table(result))
    print(f"wrote {out}/results.json, results.md, samples.jsonl ({time.perf_counter() - t0:.1f} s)")
    return 0 if result.results else 1


def _suite_of(args: argparse.Namespace) -> tuple[Suite, bool]:
    """The suite to run and whether a benchmark needing images is an error (``--task``) or a skip."""
    if args.suite:
        suite = load_suite(args.suite)
        if args.data:
            takers = [spec for spec in suite.benchmarks if spec.entry.needs_data and spec.data is None]
            if not takers:
                raise DataError(f"--data: no benchmark of suite {suite.name!r} reads a local folder without one")
            for spec in takers:
                spec.data = args.data
        if args.format:
            takers = [spec for spec in suite.benchmarks if spec.data is not None and "format" in spec.entry.options]
            if not takers:
                raise DataError(f"--format: no benchmark of suite {suite.name!r} reads local data")
            for spec in takers:
                spec.format = args.format
        return suite, False
    task = args.task
    if task in SOURCES and task != "jsonl":
        spec = BenchmarkSpec(name=task, data=args.data, format=args.format or "auto")
        if spec.data is not None and "data" not in spec.entry.options:
            raise DataError(f"benchmark {task!r} does not read --data")
        if args.format and "format" not in spec.entry.options:
            raise DataError(f"benchmark {task!r} does not read --format")
    elif task in TASK_TYPES:
        if not args.data:
            raise DataError(f"--task {task} is a task type: give the jsonl to grade with it as --data PATH")
        spec = BenchmarkSpec(name=Path(args.data).stem, source="jsonl", data=args.data, task=task,
                             format=args.format or "auto")
    else:
        raise DataError(f"--task {task!r}: not a benchmark ({', '.join(SOURCES)}) nor a task type {TASK_TYPES}")
    return Suite(name=spec.name, benchmarks=[spec]), True


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    import torch

    from vlm_mig.models import load_model, load_processor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = load_model(args.model, dtype=dtype, device=device)
    processor = load_processor(args.model)
    label = str(Path(args.model).resolve()) if Path(args.model).exists() else str(args.model)
    return model, processor, label


def _load_processor(path: str) -> Any:
    from vlm_mig.models import load_processor

    return load_processor(path)


def describe_registry() -> str:
    """The registry (task, grader, whether images are needed) and the suites, for ``--list``."""
    lines = ["benchmarks (every one uses the run's prompt template: the checkpoint's training prompt, else "
             "PromptTemplate(); a suite or --template may set another):"]
    for src in SOURCES.values():
        task = src.task or "given by 'task'"
        grader = GRADERS.get(src.task, "by task type") if src.task else "by task type"
        images = {True: "images", False: "text", None: "text or images"}[src.needs_images]
        lines.append(f"  {src.name:<14} {images:<14} task {task:<16} grader: {grader}\n      {src.description}")
    d = suites_dir()
    suites = sorted(f.stem for f in d.glob("*.yaml")) if d.is_dir() else []
    lines.append(f"suites in {d}: {', '.join(suites) or '(none)'}")
    return "\n".join(lines)


__all__ = [
    "EXTRACTIONS", "GRADERS", "BenchmarkResult", "Decoding", "EvalOptions", "ImagesRequired", "SampleRecord",
    "SampleStore", "Suite", "SuiteResult", "add_eval_command", "describe_registry", "describe_template",
    "eval_command", "evaluate", "find_suite", "gold_completion", "grade_completions", "grade_one", "grader_info",
    "load_suite", "markdown_table", "parse_template", "pass_at_k", "pass_k_values", "resolve_benchmark", "run_suite",
    "summarize", "template_from_run_config", "write_reports",
]  # fmt: skip

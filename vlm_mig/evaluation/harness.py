"""One benchmark in process: generate with a loaded model and grade (``evaluate``), or grade given completions
(``grade_completions``), into a ``BenchmarkResult``."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from vlm_mig.adapter import is_multimodal
from vlm_mig.data.schema import DataError, Sample
from vlm_mig.data.suites import BenchmarkSpec, load_eval_samples
from vlm_mig.evaluation.options import EXTRACTIONS, Decoding, EvalOptions, describe_template
from vlm_mig.evaluation.records import BenchmarkResult, SampleRecord, grade_one, now_utc, summarize
from vlm_mig.evaluation.store import SampleStore
from vlm_mig.processing import PromptTemplate, tokenizer_of
from vlm_mig.prompts import format_solution


class ImagesRequired(DataError):
    """A benchmark shows images but the model is text-only."""


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
            raise ImagesRequired(images_message(name))
        samples = load_eval_samples(spec, limit, cache_dir)
        source = spec.describe()
    else:
        samples = list(benchmark)[:limit] if limit is not None else list(benchmark)
        name = name or "samples"
        source = {"source": "samples"}
    if not samples:
        raise DataError(f"benchmark {name!r}: no items")
    if not multimodal and any(s.images for s in samples):
        raise ImagesRequired(images_message(name))
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"benchmark {name!r}: duplicate item id {s.id!r} (ids key the results)")
        seen.add(s.id)
    return name, source, samples


def images_message(name: str) -> str:
    return (
        f"benchmark {name!r} shows images, but the model is text-only (its processor has no image processor); "
        "evaluate it with a vision-language model"
    )


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_name_of(model: Any) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))


def evaluate(
    model: Any,
    processor: Any,
    benchmark: str | BenchmarkSpec | Sequence[Sample],
    *,
    samples_k: int = EvalOptions.samples,
    limit: int | None = None,
    batch_size: int = EvalOptions.batch_size,
    max_new_tokens: int = EvalOptions.max_new_tokens,
    temperature: float | None = None,
    top_p: float | None = None,
    template: PromptTemplate | None = None,
    extraction: str = EvalOptions.extraction,
    seed: int = EvalOptions.seed,
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
        benchmark, name=name, limit=limit, cache_dir=cache_dir, multimodal=is_multimodal(processor)
    )
    model_name = model_name or model_name_of(model)
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
        decoding=decoding.to_dict(), source=source, timestamp=now_utc(),
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
    now = now_utc()
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
    now = now_utc()
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

"""Suites: named lists of benchmarks with shared and per-benchmark options (``eval/*.yaml``), and running one."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from vlm_mig.adapter import is_multimodal
from vlm_mig.data.schema import DataError
from vlm_mig.data.suites import BenchmarkSpec, spec_from_mapping
from vlm_mig.evaluation.harness import ImagesRequired, evaluate, grade_completions, images_message, model_name_of
from vlm_mig.evaluation.options import EvalOptions
from vlm_mig.evaluation.records import SuiteResult
from vlm_mig.evaluation.reports import write_reports
from vlm_mig.evaluation.store import SampleStore

#: Environment variable naming another folder of suite files.
SUITES_ENV = "VLM_MIG_EVAL_SUITES"


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
    return Path(env) if env else Path(__file__).resolve().parents[2] / "eval"


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
    multimodal = gold or is_multimodal(processor)
    name = "gold" if gold else (model_name or model_name_of(model))
    result = SuiteResult(suite=suite.name, model=name, suite_file=suite.path)
    t0 = time.perf_counter()
    for spec in suite.benchmarks:
        opts = suite.options_for(spec.name, base, forced)
        if not multimodal and spec.entry.needs_images:
            _skip(result, spec.name, images_message(spec.name), strict_images, log)
            continue
        try:
            if gold:
                res = grade_completions(spec, limit=opts.limit, cache_dir=cache_dir, tokenizer=processor, store=store)
            else:
                temperature, top_p = opts.decoding()
                res = evaluate(
                    model, processor, spec,
                    samples_k=opts.samples, limit=opts.limit, batch_size=opts.batch_size,
                    max_new_tokens=opts.max_new_tokens, temperature=temperature, top_p=top_p,
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

"""Where evaluation items come from: the benchmark registry of the evaluation harness.

A :class:`BenchmarkSpec` names one benchmark of a suite and its source:

* the six shipped text benchmarks (``math500``, ``gsm8k``, ``svamp``, ``aime24``, ``amc23``,
  ``minerva_math``), read from ``datasets/`` by :func:`~vlm_mig.data.benchmarks.load_benchmark`
  (``data`` may point to another file in the same format, e.g. a longer split);
* ``superclevr``, the R1-V counting protocol, from a local folder in either published layout
  (R1-V jsonl + images, or Super-CLEVR ``images/`` + ``scenes/``);
* ``clevr_cogen_a`` / ``clevr_cogen_b`` and ``arithmetic``, drawn by the synthetic generators with a
  fixed seed (scenes are written once into a cache folder, since the model reads images from files);
* ``jsonl``: any user jsonl with a named task type (generic or R1-V fields, detected).

:func:`load_eval_samples` turns a spec into ``Sample`` objects. The synthetic generators are
prefix-stable (item ``i`` depends only on the seed and ``i``), so ``limit=5`` gives the first 5 items
of the full set and a later, larger run reuses them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vlm_mig.data.benchmarks import BENCHMARKS, get_benchmark, load_benchmark
from vlm_mig.data.clevr import QUESTION_MIXES
from vlm_mig.data.loaders import load_jsonl, load_r1v_jsonl, load_superclevr, read_jsonl_samples
from vlm_mig.data.schema import TASK_TYPES, DataError, Sample

#: Seed of the synthetic evaluation sets: distinct from the training (1) and validation (1001)
#: defaults of ``vlm_mig.config.DataConfig``, so no evaluation item is a training item.
EVAL_SEED = 12345
#: Size of a synthetic evaluation set when the suite does not give ``n``.
DEFAULT_SYNTHETIC_N = 500
#: Chain length of the OOD arithmetic set: training draws 2-4 operations (the generator's default).
LONG_ARITHMETIC_STEPS = (5, 7)

# Fields R1-V/VLM-R1 rows have and generic rows (Sample field names) do not.
_R1V_MARKERS = {"problem", "solution", "ground_truth", "conversations", "image_path"}


@dataclass
class BenchmarkSpec:
    """One benchmark to evaluate: a result name and where its items come from.

    ``source`` is a registry key (:data:`SOURCES`); empty means ``name`` is the key. Fields a source
    does not use must stay at their defaults (suite files are checked for that).
    """

    name: str  #: key in results.json and samples.jsonl
    source: str = ""  #: registry key; "" = ``name``
    data: str | None = None  #: local file/folder (superclevr, jsonl; another file for a shipped one)
    task: str | None = None  #: task type (grader) of a user jsonl: count | math | numeric | mc | text
    format: str = "auto"  #: user jsonl: auto | jsonl | r1v; superclevr: auto | superclevr | r1v
    fields: dict[str, str] | None = None  #: user jsonl field renames (see ``loaders.FieldMap``)
    image_root: str | None = None  #: base folder for relative image paths (default: the file's folder)
    n: int | None = None  #: items to draw (synthetic; default 500) or to keep (others; default all)
    seed: int = EVAL_SEED  #: synthetic sets: generator seed
    num_steps: tuple[int, int] = LONG_ARITHMETIC_STEPS  #: arithmetic: operations per problem (lo, hi)
    num_objects: tuple[int, int] = (1, 6)  #: CLEVR: objects per scene (as the training default)
    image_size: int = 112  #: CLEVR: image side in pixels (as the training default)
    question_mix: str = "counting"  #: CLEVR: question types (as ``data.synthetic_mix``: counting | multistep)
    list_objects: bool = True  #: CLEVR: gold steps list the objects they count (as ``data.synthetic_list_objects``)

    def __post_init__(self) -> None:
        self.source = self.source or self.name
        if self.source not in SOURCES:
            raise DataError(
                f"benchmark {self.name!r}: unknown source {self.source!r}; available: {', '.join(SOURCES)}"
            )
        if self.task is not None and self.task not in TASK_TYPES:
            raise DataError(f"benchmark {self.name!r}: unknown task type {self.task!r}; expected one of {TASK_TYPES}")
        self.num_steps = _pair(self.num_steps, f"benchmark {self.name!r}: num_steps")
        self.num_objects = _pair(self.num_objects, f"benchmark {self.name!r}: num_objects")
        if self.n is not None and self.n < 1:
            raise DataError(f"benchmark {self.name!r}: n must be >= 1, got {self.n}")
        if self.question_mix not in QUESTION_MIXES:
            raise DataError(f"benchmark {self.name!r}: unknown question_mix {self.question_mix!r}; expected one of "
                            f"{', '.join(QUESTION_MIXES)}")

    @property
    def entry(self) -> EvalSource:
        return SOURCES[self.source]

    def describe(self) -> dict[str, Any]:
        """The settings that define the items (recorded in results.json; part of the resume key)."""
        out: dict[str, Any] = {"source": self.source}
        for name in self.entry.options:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


def _pair(value: Any, what: str) -> tuple[int, int]:
    """``5`` or ``[5, 7]`` -> ``(lo, hi)`` with ``1 <= lo <= hi``."""
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    if not 1 <= int(lo) <= int(hi):
        raise DataError(f"{what} must be an integer or [lo, hi] with 1 <= lo <= hi, got {value!r}")
    return int(lo), int(hi)


@dataclass(frozen=True)
class EvalSource:
    """A registry entry: what a source is, what it needs, and how it loads."""

    name: str
    description: str
    task: str | None  #: grader task type; None = the spec's ``task``
    needs_images: bool | None  #: None = known only after loading (a user jsonl)
    load: Callable[[BenchmarkSpec, int | None, Path | None], list[Sample]]
    options: tuple[str, ...] = ()  #: BenchmarkSpec fields this source reads
    needs_data: bool = False  #: ``data`` is required


# --------------------------------------------------------------------------------------------
# Loaders, one per kind of source
# --------------------------------------------------------------------------------------------


def _item_count(spec: BenchmarkSpec, limit: int | None, default: int | None) -> int | None:
    """How many items to take: the smaller of the spec's ``n`` (or ``default``) and ``limit``."""
    counts = [c for c in (spec.n if spec.n is not None else default, limit) if c is not None]
    return min(counts) if counts else None


def _load_shipped(spec: BenchmarkSpec, limit: int | None, cache_dir: Path | None) -> list[Sample]:
    n = _item_count(spec, limit, None)
    if spec.data is None:
        return load_benchmark(spec.source, limit=n)
    # Another file in the shipped format (e.g. the full MATH test set): same converter, same gold rules.
    return read_jsonl_samples(_existing(spec, spec.data), get_benchmark(spec.source).convert, limit=n)


def _existing(spec: BenchmarkSpec, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"benchmark {spec.name!r}: data not found: {p}")
    return p


def _sniff_r1v(path: Path) -> bool:
    """Whether the first row of a jsonl file uses R1-V/VLM-R1 field names rather than Sample's."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    return False  # let the loader report the bad line with its location
                return isinstance(row, dict) and "answer" not in row and bool(_R1V_MARKERS & set(row))
    return False


def _load_superclevr(spec: BenchmarkSpec, limit: int | None, cache_dir: Path | None) -> list[Sample]:
    if spec.data is None:
        raise DataError(
            f"benchmark {spec.name!r} reads a local Super-CLEVR folder: pass --data PATH (R1-V jsonl + images, "
            "or a folder with images/ and scenes/) or set 'data:' in the suite"
        )
    root = _existing(spec, spec.data)
    n = _item_count(spec, limit, None)
    fmt = spec.format
    if fmt == "auto":
        fmt = _superclevr_layout(spec, root)
    if fmt == "superclevr":
        images = Path(spec.image_root) if spec.image_root else None
        return load_superclevr(root, images_dir=images, limit=n)
    if fmt == "r1v":
        if root.is_dir():
            root = _single_jsonl(spec, root)
        return load_r1v_jsonl(root, task="count", image_root=spec.image_root, limit=n)
    raise DataError(f"benchmark {spec.name!r}: format must be auto, superclevr or r1v, got {spec.format!r}")


def _superclevr_layout(spec: BenchmarkSpec, root: Path) -> str:
    """``superclevr`` for scene JSON (a scenes/ folder or a *scenes*.json file), ``r1v`` for jsonl."""
    if root.is_file():
        return "r1v" if root.suffix == ".jsonl" else "superclevr"
    if (root / "scenes").is_dir() or any(root.glob("*scenes*.json")):
        return "superclevr"
    if any(root.glob("*.jsonl")):
        return "r1v"
    raise DataError(
        f"benchmark {spec.name!r}: {root} is neither a Super-CLEVR folder (images/ + scenes/*.json or a "
        "*scenes*.json file) nor an R1-V folder (a .jsonl file whose rows name their images)"
    )


def _single_jsonl(spec: BenchmarkSpec, folder: Path) -> Path:
    files = sorted(folder.glob("*.jsonl"))
    if len(files) != 1:
        raise DataError(
            f"benchmark {spec.name!r}: expected one .jsonl file in {folder}, found {len(files)}: "
            f"{[f.name for f in files]}; pass the file itself as data"
        )
    return files[0]


def _load_clevr(condition: str) -> Callable[[BenchmarkSpec, int | None, Path | None], list[Sample]]:
    def load(spec: BenchmarkSpec, limit: int | None, cache_dir: Path | None) -> list[Sample]:
        n = _item_count(spec, limit, DEFAULT_SYNTHETIC_N)
        folder = clevr_cache(cache_dir, condition, spec.seed, n, spec.image_size, spec.num_objects,
                             spec.question_mix, spec.list_objects)
        return load_jsonl(folder / "data.jsonl", task="count")

    return load


def clevr_cache(
    cache_dir: Path | None, condition: str, seed: int, n: int, image_size: int, num_objects: tuple[int, int],
    question_mix: str = "counting", list_objects: bool = True,
) -> Path:
    """A folder holding ``write_clevr(n, condition, seed, ...)``, drawn once and reused.

    The folder name carries every generator argument, so a cached set is only reused for the same
    settings; it is written into a temporary sibling and renamed, so an interrupted run never leaves a
    half-written set behind.
    """
    from vlm_mig.data.clevr import write_clevr

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lo, hi = num_objects
    style = ("" if question_mix == "counting" else f"_{question_mix}") + ("" if list_objects else "_counts")
    folder = root / f"clevr_{condition}_seed{seed}_n{n}_{image_size}px_{lo}-{hi}obj{style}"
    if (folder / "data.jsonl").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=root))
    try:
        write_clevr(tmp, n=n, condition=condition, seed=seed, image_size=image_size, num_objects=num_objects,
                    question_mix=question_mix, list_objects=list_objects)
        if folder.exists():  # a stale folder without data.jsonl: an earlier copy that did not finish
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


_DEFAULT_CACHE: Path | None = None


def default_cache_dir() -> Path:
    """A temporary folder for synthetic sets, one per process (removed at exit)."""
    global _DEFAULT_CACHE
    if _DEFAULT_CACHE is None:
        import atexit

        _DEFAULT_CACHE = Path(tempfile.mkdtemp(prefix="vlm-mig-eval-cache-"))
        atexit.register(shutil.rmtree, _DEFAULT_CACHE, True)
    return _DEFAULT_CACHE


def _load_arithmetic(spec: BenchmarkSpec, limit: int | None, cache_dir: Path | None) -> list[Sample]:
    from vlm_mig.data.arithmetic import make_arithmetic

    # Text only, so nothing is written: the problems are drawn in memory, deterministically.
    return make_arithmetic(_item_count(spec, limit, DEFAULT_SYNTHETIC_N), seed=spec.seed, num_steps=spec.num_steps)


def _load_user_jsonl(spec: BenchmarkSpec, limit: int | None, cache_dir: Path | None) -> list[Sample]:
    if spec.data is None:
        raise DataError(f"benchmark {spec.name!r}: a user jsonl needs 'data' (the file)")
    if spec.task is None:
        raise DataError(
            f"benchmark {spec.name!r}: a user jsonl needs 'task' (one of {TASK_TYPES}), which picks the grader"
        )
    path = _existing(spec, spec.data)
    n = _item_count(spec, limit, None)
    fmt = spec.format
    if fmt == "auto":
        fmt = "r1v" if _sniff_r1v(path) else "jsonl"
    if fmt == "r1v":
        return load_r1v_jsonl(path, task=spec.task, image_root=spec.image_root, limit=n)
    if fmt == "jsonl":
        return load_jsonl(path, spec.task, fields=spec.fields, image_root=spec.image_root, limit=n)
    raise DataError(f"benchmark {spec.name!r}: format must be auto, jsonl or r1v, got {spec.format!r}")


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def _shipped_sources() -> dict[str, EvalSource]:
    return {
        b.name: EvalSource(
            b.name,
            f"shipped datasets/{b.file} ({b.rows} rows)",
            b.task,
            False,
            _load_shipped,
            options=("data", "n"),
        )
        for b in BENCHMARKS.values()
    }


SOURCES: dict[str, EvalSource] = {
    **_shipped_sources(),
    "superclevr": EvalSource(
        "superclevr",
        "Super-CLEVR counting, R1-V protocol ('How many different items are there in the image?', "
        "integer match), from a local folder",
        "count",
        True,
        _load_superclevr,
        options=("data", "format", "image_root", "n"),
        needs_data=True,
    ),
    "clevr_cogen_a": EvalSource(
        "clevr_cogen_a",
        "synthetic CLEVR-like counting, CoGenT condition A (the training colours)",
        "count",
        True,
        _load_clevr("A"),
        options=("n", "seed", "num_objects", "image_size", "question_mix", "list_objects"),
    ),
    "clevr_cogen_b": EvalSource(
        "clevr_cogen_b",
        "synthetic CLEVR-like counting, CoGenT condition B (shape-colour pairs swapped: zero-shot shift)",
        "count",
        True,
        _load_clevr("B"),
        options=("n", "seed", "num_objects", "image_size", "question_mix", "list_objects"),
    ),
    "arithmetic": EvalSource(
        "arithmetic",
        "synthetic multi-step word problems, 5-7 operations by default (training draws 2-4)",
        "numeric",
        False,
        _load_arithmetic,
        options=("n", "seed", "num_steps"),
    ),
    "jsonl": EvalSource(
        "jsonl",
        "any local jsonl (Sample fields or R1-V fields) with a named task type",
        None,
        None,
        _load_user_jsonl,
        options=("data", "task", "format", "fields", "image_root", "n"),
        needs_data=True,
    ),
}

#: BenchmarkSpec fields a suite entry may set.
SPEC_FIELDS = tuple(f.name for f in fields(BenchmarkSpec))


def list_sources() -> list[str]:
    """Registry keys accepted as a benchmark ``source``."""
    return list(SOURCES)


def spec_from_mapping(entry: dict[str, Any], where: str, base_dir: Path | None = None) -> BenchmarkSpec:
    """A spec from a suite entry; keys the source does not read are errors naming them.

    Relative ``data``/``image_root`` paths resolve against ``base_dir`` (the suite file's folder);
    ``~`` and ``$VARS`` are expanded.
    """
    unknown = sorted(set(entry) - set(SPEC_FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; a benchmark takes {list(SPEC_FIELDS)}")
    if "name" not in entry:
        raise DataError(f"{where}: a benchmark needs a 'name'")
    kwargs = dict(entry)
    for key in ("data", "image_root"):
        if kwargs.get(key) is not None:
            kwargs[key] = _resolve_path(str(kwargs[key]), base_dir)
    try:
        spec = BenchmarkSpec(**kwargs)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: {e}") from None
    unused = sorted(set(entry) - {"name", "source", *spec.entry.options})
    if unused:
        raise DataError(
            f"{where}: source {spec.source!r} does not use {unused}; it reads {list(spec.entry.options)}"
        )
    return spec


def _resolve_path(value: str, base_dir: Path | None) -> str:
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


def load_eval_samples(
    spec: BenchmarkSpec, limit: int | None = None, cache_dir: str | os.PathLike | None = None
) -> list[Sample]:
    """The items of ``spec`` (at most ``limit``); errors name the file, line or missing image."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    samples = list(spec.entry.load(spec, limit, Path(cache_dir) if cache_dir is not None else None))
    if not samples:
        raise DataError(f"benchmark {spec.name!r}: no items loaded")
    return samples


def needs_images(spec: BenchmarkSpec, samples: list[Sample] | None = None) -> bool:
    """Whether the benchmark shows images (known from the registry, else from the loaded items)."""
    known = spec.entry.needs_images
    if known is not None:
        return known
    return bool(samples) and any(s.images for s in samples)


def task_of(spec: BenchmarkSpec) -> str | None:
    """The task type (grader) of a benchmark, when the registry or the spec fixes it."""
    return spec.entry.task or spec.task


__all__ = [
    "DEFAULT_SYNTHETIC_N", "EVAL_SEED", "LONG_ARITHMETIC_STEPS", "SOURCES", "SPEC_FIELDS", "BenchmarkSpec",
    "EvalSource", "clevr_cache", "default_cache_dir", "list_sources", "load_eval_samples", "needs_images",
    "spec_from_mapping", "task_of",
]  # fmt: skip

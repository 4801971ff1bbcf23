"""Resolve a data spec from a config (a path, a shipped benchmark, or ``synthetic:...``) into Samples."""

from __future__ import annotations

from pathlib import Path

from vlm_mig.data.arithmetic import NUM_STEPS
from vlm_mig.data.benchmarks import list_benchmarks, load_benchmark
from vlm_mig.data.clevr import DEFAULT_CONDITION, DEFAULT_MIX, NUM_OBJECTS
from vlm_mig.data.loaders import load_hf_dataset, load_jsonl, load_r1v_jsonl, load_superclevr
from vlm_mig.data.schema import DataError, Sample

SYNTHETIC = ("synthetic:clevr", "synthetic:arithmetic")
#: How a path is read (``data.format``); ``auto`` tells them apart by the folder layout and the jsonl fields.
FORMATS = ("auto", "jsonl", "r1v", "superclevr", "hf")


def load_source(spec: str, *, task: str, cache_dir: str | Path, fmt: str = "auto", image_root: str | None = None,
                n: int = 2000, seed: int = 0, condition: str = DEFAULT_CONDITION, max_objects: int = NUM_OBJECTS[1],
                arithmetic_steps: tuple[int, int] = NUM_STEPS, skip_bad: bool = False,
                limit: int | None = None, question_mix: str = DEFAULT_MIX,
                list_objects: bool = True) -> list[Sample]:
    """Samples for ``spec``; synthetic sets are generated once into ``cache_dir`` and reused (same seed,
    same files). ``question_mix`` / ``list_objects``: the CLEVR questions and the style of their gold steps."""
    if spec.startswith("synthetic:"):
        return _synthetic(spec, Path(cache_dir), n, seed, condition, max_objects, arithmetic_steps, question_mix,
                          list_objects)[:limit]
    if spec.lower() in list_benchmarks() and not Path(spec).exists():
        return list(load_benchmark(spec, limit=limit))
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data source {spec!r}: no such file or folder, shipped benchmark "
                        f"({', '.join(list_benchmarks())}) or synthetic set ({', '.join(SYNTHETIC)})")
    if fmt == "auto":
        fmt = "superclevr" if path.is_dir() and (path / "scenes").exists() else "hf" if path.is_dir() else "jsonl"
        if fmt == "jsonl" and _looks_r1v(path):
            fmt = "r1v"
    kw = {"skip_bad": skip_bad, "limit": limit}
    if fmt == "jsonl":
        return list(load_jsonl(path, task, image_root=image_root, **kw))
    if fmt == "r1v":
        return list(load_r1v_jsonl(path, task=task, image_root=image_root, **kw))
    if fmt == "superclevr":
        return list(load_superclevr(path, **kw))
    if fmt == "hf":
        return list(load_hf_dataset(path, task=task, image_root=image_root, **kw))
    raise DataError(f"data.format: unknown format {fmt!r}; expected {' | '.join(FORMATS)}")


def _looks_r1v(path: Path) -> bool:
    """R1-V rows use ``problem``/``solution`` (or ``ground_truth``) instead of ``question``/``answer``. Reads the
    first non-blank line as the loaders do (bytes, so a bad encoding there is the same ``file:line`` error); a
    line that is not a JSON object is left for the loader to report."""
    from vlm_mig.data.loaders import _jsonl_lines, _parse_line

    for line_no, raw in _jsonl_lines(path):
        try:
            row = _parse_line(path, line_no, raw)
        except DataError as e:
            if "not UTF-8" in str(e):
                raise
            return False
        return "problem" in row or "ground_truth" in row or "solution" in row
    return False


def _synthetic(spec: str, cache: Path, n: int, seed: int, condition: str, max_objects: int,
               steps: tuple[int, int], mix: str, list_objects: bool) -> list[Sample]:
    from vlm_mig.data.synthetic import make_arithmetic, write_clevr

    if spec == "synthetic:arithmetic":
        return make_arithmetic(n, seed=seed, num_steps=tuple(steps))
    if spec != "synthetic:clevr":
        raise DataError(f"unknown synthetic set {spec!r}; expected one of {SYNTHETIC}")
    style = ("" if mix == "counting" else f"-{mix}") + ("" if list_objects else "-counts")
    folder = cache / f"clevr-{condition}-n{n}-seed{seed}-max{max_objects}{style}"
    if not (folder / "data.jsonl").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        write_clevr(tmp, n=n, condition=condition, seed=seed, num_objects=(1, max_objects), question_mix=mix,
                    list_objects=list_objects)
        tmp.replace(folder)
    return list(load_jsonl(folder / "data.jsonl", "count"))

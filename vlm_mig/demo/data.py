"""The demo's data: CLEVR-like sets written once (and reused), their blank-image twins, the blind prior.

* ``write_set``: ``root/<name>-<condition>-n<n>-seed<seed>-obj<lo>-<hi>-<mix>/data.jsonl`` with its images and
  scene JSON, written under a temporary name and renamed when complete (a killed run never leaves half a set
  that looks finished).
* ``blank_twin``: the same rows with every image replaced by one constant grey image of the same size: the
  control for "does the model use the image?". A model trained on the twin can only learn what the question
  says.
* ``blind_baseline``: the most common training answer per question type, asked of the test sets: the ceiling
  of a model that ignores the image and does not even read which objects the question names.
"""

from __future__ import annotations

import collections
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from vlm_mig.data.schema import Sample
from vlm_mig.demo.measure import accuracy_by, answers_by_question_type

BLANK_IMAGE = "blank.png"
BLANK_GREY = (128, 128, 128)


def say(msg: str) -> None:
    """A line above the progress bars."""
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def write_set(root: Path, name: str, n: int, condition: str, seed: int, objects: tuple[int, int],
              mix: str) -> Path:
    """Write a CLEVR-like set once (multi-step questions, gold steps without object listings); return its
    ``data.jsonl``. A progress bar follows the images as they are written."""
    from tqdm.auto import tqdm

    from vlm_mig.data.clevr import write_clevr

    folder = root / f"{name}-{condition}-n{n}-seed{seed}-obj{objects[0]}-{objects[1]}-{mix}"
    if (folder / "data.jsonl").is_file():
        say(f"  reusing {folder}")
        return folder / "data.jsonl"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    error: list[BaseException] = []

    def work() -> None:
        try:
            write_clevr(tmp, n=n, condition=condition, seed=seed, num_objects=objects, question_mix=mix,
                        list_objects=False)
        except BaseException as e:  # re-raised below, in the caller's thread
            error.append(e)

    th = threading.Thread(target=work, daemon=True)
    desc = f"data {name} ({condition}, {objects[0]}-{objects[1]} objects)"
    with tqdm(total=n, desc=desc, unit="scene", file=sys.stderr, dynamic_ncols=True) as bar:
        th.start()
        while th.is_alive():
            th.join(0.3)
            images = tmp / "images"
            done = sum(1 for _ in images.iterdir()) if images.is_dir() else 0
            bar.update(max(0, min(n, done) - bar.n))
        bar.update(n - bar.n)
    if error:
        raise error[0]
    tmp.replace(folder)
    return folder / "data.jsonl"


def blank_twin(data_jsonl: Path) -> Path:
    """``data-blank.jsonl`` beside ``data_jsonl``: the same rows, every image replaced by ``blank.png``, a
    constant grey image of the first image's size (written once)."""
    from PIL import Image

    folder = data_jsonl.parent
    out = folder / "data-blank.jsonl"
    if out.is_file():
        return out
    rows = [json.loads(line) for line in data_jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    with Image.open(folder / rows[0]["images"][0]) as first:
        size = first.size
    Image.new("RGB", size, BLANK_GREY).save(folder / BLANK_IMAGE)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**row, "images": [BLANK_IMAGE] * len(row["images"])}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


def load(path: Path) -> list[Sample]:
    from vlm_mig.data.loaders import load_jsonl

    return list(load_jsonl(path, "count"))


def scene_objects(data_jsonl: Path, samples: list[Sample]) -> dict[str, list[dict[str, Any]]]:
    """Each sample's scene objects (from the set's scene JSON), by sample id."""
    folder = data_jsonl.parent
    return {s.id: json.loads((folder / s.meta["scene"]).read_text())["objects"] for s in samples}


def blind_baseline_of(paths: dict[str, Path]) -> dict[str, Any]:
    """``blind_baseline`` of the demo's sets (``make_data``'s ``train``, ``id`` and ``ood`` files)."""
    return blind_baseline(load(paths["train"]), {"id": load(paths["id"]), "ood": load(paths["ood"])})


def blind_baseline(train: list[Sample], sets: dict[str, list[Sample]]) -> dict[str, Any]:
    """Accuracy of answering without the image: the most common training answer for each question type.
    A model at this level answers from the question type alone."""
    guess = {t: collections.Counter(a).most_common(1)[0][0] for t, a in answers_by_question_type(train).items()}
    out: dict[str, Any] = {"answer_by_question_type": guess}
    for name, samples in sets.items():
        types = [s.meta.get("question_type", "?") for s in samples]
        hits = [guess.get(t) == s.answer for t, s in zip(types, samples)]
        out[name] = {"accuracy": sum(hits) / len(hits) if hits else None,
                     "accuracy_by_question_type": accuracy_by(hits, types),
                     "accuracy_by_objects": accuracy_by(hits, [s.meta.get("num_objects", "?") for s in samples])}
    return out

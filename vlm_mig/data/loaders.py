"""Loaders that turn local data files into :class:`~vlm_mig.data.schema.Sample` lists.

Formats read as they are published, without conversion:

* :func:`load_r1v_jsonl` -- R1-V / VLM-R1 jsonl (``image``/``image_path``, ``problem``/``question``,
  ``solution``/``ground_truth``, or VLM-R1 ``conversations``).
* :func:`load_superclevr` -- a Super-CLEVR / CLEVR folder of images and scene JSON; the question is
  the R1-V counting question and the gold answer is the number of objects.
* :func:`load_jsonl` -- any jsonl with a named task type and configurable field names.
* :func:`load_hf_dataset` -- Hugging Face ``datasets`` on local files or ``save_to_disk`` folders.

Every loader checks each row (JSON syntax, required fields, non-empty answer, every image opened and
verified with PIL) and raises :class:`DataError` with ``file:line`` on the first bad row. With
``skip_bad=True`` bad rows are skipped instead, and each reason is kept in ``result.report.skipped``
(and the count is logged as a warning), so nothing disappears unnoticed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_mig.data.schema import TASK_TYPES, DataError, Sample, where
from vlm_mig.prompts import ANSWER_CLOSE, ANSWER_OPEN

log = logging.getLogger(__name__)

#: The R1-V counting prompt used for Super-CLEVR (and CLEVR-70k) evaluation.
COUNT_QUESTION = "How many different items are there in the image?"

_IMAGE_TAG = "<image>"

# What PIL raises on unreadable, truncated or corrupt files (it has no single base class for them).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What one load did: where from, how many samples it kept, and why it skipped the others."""

    source: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        return f"{self.source}: loaded {self.loaded}, skipped {self.n_skipped}"


class SampleList(list):
    """A ``list[Sample]`` that also carries the :class:`LoadReport` of the load that made it.

    It behaves as a plain list everywhere; ``.report.skipped`` lists one reason (``file:line: why``)
    per row dropped under ``skip_bad=True``.
    """

    def __init__(self, samples: list[Sample], report: LoadReport):
        super().__init__(samples)
        self.report = report


class _Collector:
    """Accumulates samples, enforcing unique ids, ``limit`` and the ``skip_bad`` policy."""

    def __init__(self, source: Any, skip_bad: bool, limit: int | None):
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.report = LoadReport(str(source))
        self.skip_bad = skip_bad
        self.limit = limit
        self.samples: list[Sample] = []
        self._id_loc: dict[str, str] = {}

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.samples) >= self.limit

    def take(self, loc: str, make: Callable[..., Sample], *args: Any) -> None:
        """Add ``make(*args)``; on a :class:`DataError` re-raise or (``skip_bad``) record the reason."""
        try:
            sample = make(*args)
            # Ids key rollout groups and evaluation records, so a repeat would silently merge two rows.
            if sample.id in self._id_loc:
                raise DataError(
                    f"{loc}: duplicate id {sample.id!r} (first seen at {self._id_loc[sample.id]})"
                )
        except DataError as err:
            if not self.skip_bad:
                raise
            self.report.skipped.append(str(err))
            return
        self._id_loc[sample.id] = loc
        self.samples.append(sample)

    def result(self) -> SampleList:
        self.report.loaded = len(self.samples)
        if self.report.skipped:
            log.warning(
                "%s: skipped %d bad row(s) (see .report.skipped); first: %s",
                self.report.source,
                self.report.n_skipped,
                self.report.skipped[0],
            )
        return SampleList(self.samples, self.report)


# --------------------------------------------------------------------------------------------
# Field helpers (shared by every loader)
# --------------------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """Render a gold number the way answers are written: ``27.0 -> "27"``, ``2.5 -> "2.5"``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def answer_span(text: str) -> str | None:
    """Inner text of the last complete ``<answer>…</answer>`` pair (unstripped), or ``None``.

    The one answer-tag parser: the graders (``rewards.extract_answer``) and the loaders
    (:func:`extract_answer_tag`) both read answers through it. The opening tag taken is the one
    nearest before the last closing tag, so ``<answer>a<answer>b</answer>`` gives ``b``.
    """
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(ANSWER_OPEN) : end]


def extract_answer_tag(text: str) -> str:
    """The stripped inside of the last ``<answer>...</answer>`` in ``text``, or ``text`` itself if untagged.

    Same span as the graders read (:func:`answer_span`).
    """
    span = answer_span(text)
    return (span if span is not None else text).strip()


def _answer_text(value: Any, loc: str, name: str) -> str:
    """Normalise an answer field (string, int or float) to its stripped string form."""
    if value is None:
        raise DataError(f"{loc}: missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{loc}: field {name!r} must be a string or a number, got {type(value).__name__}")
    text = extract_answer_tag(value) if isinstance(value, str) else format_number(value)
    if not text:
        raise DataError(f"{loc}: empty answer in field {name!r}")
    return text


def _text_field(value: Any, loc: str, name: str) -> str:
    if value is None:
        raise DataError(f"{loc}: missing field {name!r}")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{loc}: field {name!r} must be a non-empty string")
    return value


def _str_list(value: Any, loc: str, name: str, *, numbers: bool = False) -> list[str]:
    """A list of strings (a lone string counts as a one-item list); numbers allowed for answers."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if numbers and isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(format_number(item))
        elif isinstance(item, str):
            out.append(item.strip())
        else:
            raise DataError(f"{loc}: field {name!r} must hold strings, got {type(item).__name__}")
    return [s for s in out if s]


def _first(record: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
    """The first of ``names`` present (and not null) in ``record``, with its value."""
    for name in names:
        if record.get(name) is not None:
            return name, record[name]
    return None, None


def _make_sample(loc: str, **kwargs: Any) -> Sample:
    """``Sample(**kwargs)``, with the location prefixed to any schema error it raises."""
    try:
        return Sample(**kwargs)
    except DataError as err:
        raise DataError(f"{loc}: {err}") from None


def _check_task(task: str) -> str:
    if task not in TASK_TYPES:
        raise DataError(f"unknown task type {task!r}; expected one of {TASK_TYPES}")
    return task


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


#: The most extreme aspect ratio the Qwen2-VL image processing takes (qwen-vl-utils' MAX_RATIO).
MAX_ASPECT_RATIO = 200


def check_image(source: Path | bytes, loc: str, what: str) -> str | None:
    """Open an image file (or its bytes) as training will: verify its checksums, then decode every pixel, so a
    corrupt compressed stream fails here with the file named, not when a step draws it; an aspect ratio the image
    processing refuses fails too. Returns the format (``png``, ``jpeg``, ...). ``what`` names it in errors."""
    def opened():
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)

    try:
        with opened() as im:
            fmt = im.format
            im.verify()  # chunk checksums; the image cannot be used after this
        with opened() as im:
            im.load()  # the whole compressed stream
            w, h = im.size
    except _PIL_ERRORS as err:
        raise DataError(f"{loc}: corrupt {what}: {err}") from None
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise DataError(f"{loc}: {what} is {w}x{h}: an aspect ratio above {MAX_ASPECT_RATIO}:1, which the image "
                        "processing refuses")
    return fmt.lower() if fmt else None


class _ImageChecker:
    """Resolves image paths and checks each file once per load (many rows share one image)."""

    def __init__(self, verify: bool):
        self.verify = verify
        self._ok: set[str] = set()

    def check(self, path: Path, loc: str, hint: str = "") -> str:
        key = str(path)
        if key in self._ok:
            return key
        if not path.is_file():
            raise DataError(f"{loc}: image not found: {path}{hint}")
        if self.verify:
            check_image(path, loc, f"image {path}")
        self._ok.add(key)
        return key

    def resolve(self, value: Any, base: Path, loc: str, name: str) -> list[str]:
        """Image field (a path or list of paths, relative ones under ``base``) -> absolute paths."""
        paths = _str_list(value, loc, name)
        if not paths:
            raise DataError(f"{loc}: field {name!r} holds no image path")
        hint = f" (relative paths are resolved against {base}; pass image_root= to change that)"
        return [self.check((base / p).resolve(), loc, hint) for p in paths]


def _image_cache_dir(image_cache: str | os.PathLike | None) -> Path:
    """Where images embedded in a dataset are written out so that ``Sample.images`` holds paths."""
    if image_cache is not None:
        return Path(image_cache)
    root = os.environ.get("VLM_MIG_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "vlm_mig" / "images"


def _store_image_bytes(data: bytes, cache: Path, loc: str) -> str:
    """Write embedded image bytes to ``cache`` under a content hash; verify them first."""
    ext = check_image(data, loc, "embedded image") or "png"
    ext = {"jpeg": "jpg"}.get(ext, ext)
    path = cache / f"{hashlib.sha1(data).hexdigest()[:24]}.{ext}"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Another process may be writing the same file: write aside, then rename atomically.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path.resolve())


def _pil_to_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# jsonl reading
# --------------------------------------------------------------------------------------------


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{where(path)}: file not found")
    return path


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers (bytes, so a bad encoding fails on its own line)."""
    with open(_require_file(path), "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                yield line_no, raw


def _parse_line(path: Path, line_no: int, raw: bytes) -> dict[str, Any]:
    loc = where(path, line_no)
    try:
        record = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{loc}: not UTF-8: {err}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{loc}: malformed JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{loc}: expected a JSON object, got {type(record).__name__}")
    return record


RowConverter = Callable[[dict[str, Any], str, int], Sample]


def read_jsonl_samples(
    path: str | os.PathLike, convert: RowConverter, *, skip_bad: bool = False, limit: int | None = None
) -> SampleList:
    """Apply ``convert(record, loc, line_no)`` to every object of a jsonl file.

    The building block of the jsonl loaders (and of the benchmark registry): it owns parsing,
    locations, ``limit`` and the ``skip_bad`` policy, so converters only map fields.
    """
    path = Path(path)

    def build(line_no: int, raw: bytes, loc: str) -> Sample:
        return convert(_parse_line(path, line_no, raw), loc, line_no)

    col = _Collector(path, skip_bad, limit)
    lines = 0
    for line_no, raw in _jsonl_lines(path):
        lines += 1
        if col.full:
            break
        loc = where(path, line_no)
        col.take(loc, build, line_no, raw, loc)
    if not lines:
        raise DataError(f"{where(path)}: no rows (the file holds no JSON lines)")
    return col.result()


# --------------------------------------------------------------------------------------------
# R1-V / VLM-R1 records (jsonl and HF datasets share this mapping)
# --------------------------------------------------------------------------------------------

_R1V_IMAGE = ("image", "image_path", "images")
_R1V_QUESTION = ("problem", "question")
_R1V_ANSWER = ("solution", "ground_truth", "answer")
_R1V_KNOWN = {*_R1V_IMAGE, *_R1V_QUESTION, *_R1V_ANSWER, "answer_variants", "id", "conversations"}


def _split_image_tags(text: str, n_images: int, loc: str) -> tuple[str | None, list[dict] | None]:
    """VLM-R1 ``<image>`` tags -> a plain question (tags leading) or chat messages (tags inside)."""
    n_tags = text.count(_IMAGE_TAG)
    if n_tags and n_tags != n_images:
        raise DataError(f"{loc}: {n_tags} {_IMAGE_TAG} tag(s) for {n_images} image(s)")
    body = text.lstrip()
    while body.startswith(_IMAGE_TAG):
        body = body[len(_IMAGE_TAG) :].lstrip()
    if _IMAGE_TAG not in body:
        return body.strip(), None
    # Tags inside the text mark where each image goes, which only ``messages`` can express.
    content: list[dict[str, Any]] = []
    for i, chunk in enumerate(text.split(_IMAGE_TAG)):
        if i:
            content.append({"type": "image"})
        if chunk.strip():
            content.append({"type": "text", "text": chunk.strip()})
    return None, [{"role": "user", "content": content}]


def _conversation_turns(value: Any, loc: str) -> tuple[str, Any]:
    """VLM-R1 ``conversations`` -> (first human turn, first gpt turn)."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{loc}: field 'conversations' must be a list of {{'from', 'value'}} objects")
    human = next((t.get("value") for t in value if t.get("from") in ("human", "user")), None)
    gpt = next((t.get("value") for t in value if t.get("from") in ("gpt", "assistant")), None)
    return _text_field(human, loc, "conversations[human]"), gpt


def _r1v_sample(
    record: dict[str, Any],
    loc: str,
    *,
    default_id: str,
    task: str,
    images_of: Callable[[Any, str, str], list[str]],
    require_image: bool,
) -> Sample:
    """Map one R1-V / VLM-R1 record to a Sample; ``images_of(value, loc, field)`` resolves images."""
    image_name, image_value = _first(record, _R1V_IMAGE)
    if image_name is None:
        if require_image:
            raise DataError(f"{loc}: missing field 'image' or 'image_path'")
        images: list[str] = []
    else:
        images = images_of(image_value, loc, image_name)

    messages = None
    if "conversations" in record:
        question, gold = _conversation_turns(record["conversations"], loc)
        answer_name = "conversations[gpt]"
        if images:
            question, messages = _split_image_tags(question, len(images), loc)
    else:
        q_name, question = _first(record, _R1V_QUESTION)
        if q_name is None:
            raise DataError(f"{loc}: missing field 'problem' or 'question'")
        question = _text_field(question, loc, q_name)
        answer_name, gold = _first(record, _R1V_ANSWER)
        if answer_name is None:
            raise DataError(f"{loc}: missing field 'solution' or 'ground_truth'")

    # None extras are columns other rows have (datasets fills them in); bytes/PIL are not metadata.
    meta = {
        k: v
        for k, v in record.items()
        if k not in _R1V_KNOWN and v is not None and not isinstance(v, (bytes, Image.Image))
    }
    meta["source"] = loc
    return _make_sample(
        loc,
        id=str(record["id"]) if record.get("id") is not None else default_id,
        task=task,
        question=question,
        messages=messages,
        images=images,
        answer=_answer_text(gold, loc, answer_name),
        answer_variants=_str_list(record.get("answer_variants"), loc, "answer_variants", numbers=True),
        meta=meta,
    )


def load_r1v_jsonl(
    path: str | os.PathLike,
    *,
    task: str = "count",
    image_root: str | os.PathLike | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
    verify_images: bool = True,
) -> SampleList:
    """Load an R1-V or VLM-R1 jsonl file as published.

    Fields: image ``image`` / ``image_path`` (a path or a list; relative paths are resolved against
    ``image_root``, else the jsonl's folder), question ``problem`` / ``question``, answer
    ``solution`` / ``ground_truth`` (``<answer> 3 </answer>`` is unwrapped to ``3``; numbers become
    strings), optional ``answer_variants`` and ``id`` (default ``<file stem>-<line>``). The VLM-R1
    form ``conversations: [{from: human, value: "<image>..."}, {from: gpt, value: ...}]`` is also
    read; ``<image>`` tags inside the text become a ``messages`` prompt. Other fields go to ``meta``.

    ``task`` defaults to ``"count"`` because R1-V's image sets (CLEVR-70k, Super-CLEVR) are counting;
    pass ``"math"`` (GeoQA), ``"mc"`` etc. for others. An image is required on every row.
    """
    path = Path(path)
    task = _check_task(task)
    base = Path(image_root) if image_root is not None else path.parent
    checker = _ImageChecker(verify_images)

    def convert(record: dict[str, Any], loc: str, line_no: int) -> Sample:
        return _r1v_sample(
            record,
            loc,
            default_id=f"{path.stem}-{line_no}",
            task=task,
            images_of=lambda value, loc, name: checker.resolve(value, base, loc, name),
            require_image=True,
        )

    return read_jsonl_samples(path, convert, skip_bad=skip_bad, limit=limit)


# --------------------------------------------------------------------------------------------
# Generic jsonl
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldMap:
    """Which record field feeds which :class:`Sample` field in :func:`load_jsonl`."""

    question: str = "question"
    messages: str = "messages"
    images: str = "images"
    answer: str = "answer"
    answer_variants: str = "answer_variants"
    gold_steps: str = "gold_steps"
    id: str = "id"
    meta: str = "meta"

    @classmethod
    def of(cls, value: FieldMap | dict[str, str] | None) -> FieldMap:
        """Accept a FieldMap, a partial ``{sample_field: record_field}`` dict (e.g. from YAML), or None."""
        if value is None or isinstance(value, FieldMap):
            return value or cls()
        valid = [f.name for f in dataclass_fields(cls)]
        unknown = set(value) - set(valid)
        if unknown:
            raise DataError(f"unknown field-map keys {sorted(unknown)}; valid: {valid}")
        return cls(**value)


def _check_messages(value: Any, loc: str, name: str) -> list[dict[str, Any]]:
    """Validate a transformers-style chat list and return it."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{loc}: field {name!r} must be a non-empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{loc}: {name}[{i}] must be an object with 'role' and 'content'")
        content = msg["content"]
        if not isinstance(content, (str, list)):
            raise DataError(f"{loc}: {name}[{i}].content must be a string or a list of parts")
    return value


def _inline_image_paths(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Move paths written inside image parts (qwen-vl-utils style) out to a list, in order."""
    paths: list[str] = []
    out = []
    for msg in messages:
        if isinstance(msg["content"], list):
            parts = []
            for part in msg["content"]:
                if isinstance(part, dict) and part.get("type") == "image":
                    src = next(
                        (part[k] for k in ("image", "path", "url") if isinstance(part.get(k), str)), None
                    )
                    if src is not None:
                        paths.append(src.removeprefix("file://"))
                    part = {"type": "image"}
                parts.append(part)
            msg = {**msg, "content": parts}
        out.append(msg)
    return out, paths


def _count_image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for msg in messages
        if isinstance(msg["content"], list)
        for part in msg["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


def _gold_steps(value: Any, loc: str, name: str) -> list[str] | None:
    """``gold_steps`` as a list; a single string is split into its non-blank lines."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.splitlines()
    return _str_list(value, loc, name) or None


def load_jsonl(
    path: str | os.PathLike,
    task: str,
    *,
    fields: FieldMap | dict[str, str] | None = None,
    image_root: str | os.PathLike | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
    verify_images: bool = True,
) -> SampleList:
    """Load any jsonl whose rows are one prompt each, for the given ``task`` type.

    Field names default to the Sample's own (``question`` or ``messages``, ``images``, ``answer``,
    ``answer_variants``, ``gold_steps``, ``id``, ``meta``) and are renamed with ``fields``, e.g.
    ``fields={"question": "prompt", "answer": "target"}``. ``messages`` is a transformers chat list
    whose ``{"type": "image"}`` parts mark where the ``images`` go (parts may instead carry the path
    themselves, as ``{"type": "image", "image": "a.png"}``). Relative image paths are resolved
    against ``image_root``, else the file's folder. Fields not mapped are kept in ``meta``, merged
    with the record's own ``meta`` object.
    """
    path = Path(path)
    task = _check_task(task)
    fm = FieldMap.of(fields)
    base = Path(image_root) if image_root is not None else path.parent
    checker = _ImageChecker(verify_images)
    mapped = {getattr(fm, f.name) for f in dataclass_fields(fm)}
    if fm.images == "images":
        mapped.add("image")

    def convert(record: dict[str, Any], loc: str, line_no: int) -> Sample:
        question, messages = record.get(fm.question), record.get(fm.messages)
        if (question is None) == (messages is None):
            raise DataError(f"{loc}: exactly one of fields {fm.question!r} or {fm.messages!r} must be set")
        images_field = fm.images
        if record.get(fm.images) is None and fm.images == "images" and record.get("image") is not None:
            images_field = "image"  # the singular R1-V spelling, accepted where the default name is used
        image_paths = _str_list(record.get(images_field), loc, images_field)
        if messages is not None:
            messages, inline = _inline_image_paths(_check_messages(messages, loc, fm.messages))
            if inline and image_paths:
                raise DataError(f"{loc}: image paths both in {fm.messages!r} parts and in {fm.images!r}")
            image_paths = image_paths or inline
            n_parts = _count_image_parts(messages)
            if n_parts != len(image_paths):
                raise DataError(
                    f"{loc}: {n_parts} image part(s) in {fm.messages!r} for {len(image_paths)} image(s)"
                )
        else:
            question = _text_field(question, loc, fm.question)
        extra_meta = record.get(fm.meta) or {}
        if not isinstance(extra_meta, dict):
            raise DataError(f"{loc}: field {fm.meta!r} must be an object")
        meta = {k: v for k, v in record.items() if k not in mapped}
        meta.update(extra_meta)
        meta["source"] = loc
        return _make_sample(
            loc,
            id=str(record[fm.id]) if record.get(fm.id) is not None else f"{path.stem}-{line_no}",
            task=task,
            question=question,
            messages=messages,
            images=checker.resolve(image_paths, base, loc, fm.images) if image_paths else [],
            answer=_answer_text(record.get(fm.answer), loc, fm.answer),
            answer_variants=_str_list(record.get(fm.answer_variants), loc, fm.answer_variants, numbers=True),
            gold_steps=_gold_steps(record.get(fm.gold_steps), loc, fm.gold_steps),
            meta=meta,
        )

    return read_jsonl_samples(path, convert, skip_bad=skip_bad, limit=limit)


# --------------------------------------------------------------------------------------------
# Super-CLEVR / CLEVR scenes
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where(path, err.lineno)}: malformed JSON: {err.msg} (column {err.colno})"
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{where(path)}: not UTF-8: {err}") from None


def _scene_files(root: Path) -> list[Path]:
    """The scene JSON files of a Super-CLEVR/CLEVR folder (or the one file given)."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{where(root)}: folder not found")
    scenes_dir = root / "scenes"
    files = sorted(scenes_dir.glob("*.json")) if scenes_dir.is_dir() else []
    files = files or sorted(root.glob("*scenes*.json"))
    if not files:
        raise DataError(
            f"{where(root)}: no scene JSON found (expected scenes/*.json or a *scenes*.json file)"
        )
    return files


def _scene_image(scene: dict[str, Any], scene_file: Path, images_dir: Path) -> Path:
    """The image a scene describes: its ``image_filename``, else the scene file's stem + ``.png``."""
    name = scene.get("image_filename") or f"{scene_file.stem}.png"
    path = images_dir / name
    # CLEVR keeps images in images/<split>/ and names the split in each scene.
    split = scene.get("split")
    if not path.exists() and isinstance(split, str) and (images_dir / split / name).exists():
        path = images_dir / split / name
    return path.resolve()


def load_superclevr(
    root: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    question: str = COUNT_QUESTION,
    skip_bad: bool = False,
    limit: int | None = None,
    verify_images: bool = True,
) -> SampleList:
    """Counting samples from a Super-CLEVR (or CLEVR) folder: gold = number of objects in the scene.

    ``root`` holds ``images/*.png`` and either ``scenes/*.json`` (one scene object with an
    ``objects`` list per file) or one file with a top-level ``scenes`` list (Super-CLEVR's
    ``superCLEVR_scenes.json``, CLEVR's ``scenes/CLEVR_val_scenes.json``), each scene naming its
    ``image_filename``. ``root`` may also be the scenes file itself; ``images_dir`` overrides
    ``<root>/images``. The question is R1-V's ``COUNT_QUESTION``; ids are the image file stems.
    """
    root = Path(root)
    files = _scene_files(root)
    base = root.parent if root.is_file() else root
    images = Path(images_dir) if images_dir is not None else base / "images"
    checker = _ImageChecker(verify_images)
    col = _Collector(root, skip_bad, limit)

    def convert(scene: Any, scene_file: Path, loc: str) -> Sample:
        if not isinstance(scene, dict):
            raise DataError(f"{loc}: a scene must be a JSON object")
        objects = scene.get("objects")
        if not isinstance(objects, list):
            raise DataError(f"{loc}: missing field 'objects' (a list)")
        image = _scene_image(scene, scene_file, images)
        meta = {"source": loc, "scene_file": str(scene_file)}
        if "image_index" in scene:
            meta["image_index"] = scene["image_index"]
        return _make_sample(
            loc,
            id=image.stem,
            task="count",
            question=question,
            images=[checker.check(image, loc, f" (pass images_dir= if images live elsewhere than {images})")],
            answer=str(len(objects)),
            meta=meta,
        )

    for scene_file in files:
        if col.full:
            break
        try:
            data = _read_json(scene_file)
        except DataError as err:
            if not skip_bad:
                raise
            col.report.skipped.append(str(err))
            continue
        if isinstance(data, dict) and isinstance(data.get("scenes"), list):
            entries = [(s, where(scene_file, None, f"scenes[{i}]")) for i, s in enumerate(data["scenes"])]
        else:
            entries = [(data, where(scene_file))]
        for scene, loc in entries:
            if col.full:
                break
            col.take(loc, convert, scene, scene_file, loc)
    return col.result()


# --------------------------------------------------------------------------------------------
# Hugging Face datasets on local files
# --------------------------------------------------------------------------------------------

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _open_hf(source: Path, split: str, builder: str | None, cache_dir: str | None):
    """Open ``source`` with ``datasets``: a ``save_to_disk`` folder, a data file, or a data folder."""
    from datasets.exceptions import DatasetsError

    import datasets  # heavy import, only needed here

    try:
        if source.is_dir() and any((source / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(source))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{where(source)}: no split {split!r}; available: {sorted(ds)}")
                ds = ds[split]
            return ds
        if source.is_file():
            name = builder or _BUILDERS.get(source.suffix.lower())
            if name is None:
                raise DataError(
                    f"{where(source)}: unknown data file type; pass builder= (json, parquet, csv, ...)"
                )
            return datasets.load_dataset(
                name, data_files={split: str(source)}, split=split, cache_dir=cache_dir
            )
        if source.is_dir():
            # e.g. a hub dataset fetched with `huggingface-cli download --local-dir`
            return datasets.load_dataset(str(source), split=split, cache_dir=cache_dir)
    except DataError:
        raise
    # datasets reports parse failures as its own errors, pyarrow's (ValueError) or OSError
    except (DatasetsError, OSError, ValueError) as err:
        raise DataError(f"{where(source)}: datasets could not load it: {err}") from None
    raise DataError(f"{where(source)}: not found")


def _undecoded_images(ds):
    """Cast image columns to ``decode=False`` so rows carry the stored bytes, not decoded pixels."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds


def load_hf_dataset(
    source: str | os.PathLike | Any,
    *,
    split: str = "train",
    builder: str | None = None,
    task: str = "count",
    image_root: str | os.PathLike | None = None,
    image_cache: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    require_image: bool = False,
    skip_bad: bool = False,
    limit: int | None = None,
    verify_images: bool = True,
) -> SampleList:
    """Load R1-V-style rows (``image``, ``problem``, ``solution``) through Hugging Face ``datasets``.

    ``source`` is a local data file (jsonl/json/parquet/csv/arrow, read with
    ``datasets.load_dataset(builder, data_files=...)``; ``builder`` overrides the guess from the
    suffix), a ``save_to_disk`` folder (``load_from_disk``; ``split`` picks from a DatasetDict), a
    local dataset folder (e.g. a hub snapshot), or a ``datasets.Dataset``. Columns follow
    :func:`load_r1v_jsonl`. Images stored in the dataset (``Image`` features, PIL images, bytes) are
    written once to ``image_cache`` (default ``$VLM_MIG_CACHE/vlm_mig/images``, else under ``~/.cache``),
    named by content hash, so ``Sample.images`` holds paths; string paths are resolved against
    ``image_root``, else the source's folder. Rows are numbered from 1 in error messages.
    ``cache_dir`` is passed to ``datasets`` for its Arrow cache.
    """
    import datasets

    task = _check_task(task)
    if isinstance(source, datasets.Dataset):
        ds, name, base, stem = source, f"<Dataset {source.info.dataset_name or 'in memory'}>", None, "row"
    else:
        path = Path(source)
        ds = _open_hf(path, split, builder, None if cache_dir is None else str(cache_dir))
        name, base, stem = str(path), path.parent if path.is_file() else path, path.stem
    if image_root is not None:
        base = Path(image_root)
    ds = _undecoded_images(ds)
    cache = _image_cache_dir(image_cache)
    checker = _ImageChecker(verify_images)

    def image_path(item: Any, loc: str, field_name: str) -> str:
        if isinstance(item, Image.Image):
            return _store_image_bytes(_pil_to_bytes(item), cache, loc)
        if isinstance(item, dict) and item.get("bytes"):
            return _store_image_bytes(item["bytes"], cache, loc)
        if isinstance(item, dict):
            item = item.get("path")
        if isinstance(item, str) and item:
            if base is None and not Path(item).is_absolute():
                raise DataError(f"{loc}: relative image path {item!r} needs image_root=")
            return checker.check((base / item if base else Path(item)).resolve(), loc)
        raise DataError(f"{loc}: field {field_name!r} holds no image")

    def images_of(value: Any, loc: str, field_name: str) -> list[str]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise DataError(f"{loc}: field {field_name!r} holds no image")
        return [image_path(item, loc, field_name) for item in items]

    def convert(row: dict[str, Any], loc: str, default_id: str) -> Sample:
        return _r1v_sample(
            row, loc, default_id=default_id, task=task, images_of=images_of, require_image=require_image
        )

    col = _Collector(name, skip_bad, limit)
    for i, row in enumerate(ds):
        if col.full:
            break
        loc = where(name, i + 1)
        col.take(loc, convert, row, loc, f"{stem}-{i + 1}")
    return col.result()

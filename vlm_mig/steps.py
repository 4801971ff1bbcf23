"""Visual-aware step segmentation (SPEC.md section 1): completion token ids -> token spans.

A completion ``<think> S_1 … S_K </think> <answer> a </answer>`` is cut into reasoning steps ``S_k`` that
are **token** spans, so later stages (the MIG scorer, the masks of the loss) never re-tokenize text.

How it works, in the order of :func:`segment`:

1. The ids (padding removed) are mapped to the exact bytes each token stands for (:class:`TokenBytes`:
   the ByteLevel byte<->unicode table for GPT-2/Qwen/Llama-3 style byte-level BPE, ``▁``/``<0xNN>`` for
   SentencePiece byte-fallback vocabularies, the content for added/special tokens). Their concatenation
   ``text`` is the decoded completion as bytes; token ``i`` covers ``text[start_i:start_{i+1}]``. A token
   may hold part of a multi-byte UTF-8 character; a **cut** is a token index whose start is a character
   boundary (index 0 and ``n`` always are). Every span boundary this module returns is a cut, so no token
   and no character is ever split.
2. Tags are found in ``text`` (they may be one added token or several ordinary tokens). A token that
   overlaps a tag belongs to the tag: ``<think>`` ends at the first cut at or after the tag's last byte,
   ``</think>`` starts at the last cut at or before its first byte (same for the answer tags); a token
   holding two tags belongs to the first, so a tag span can be empty. The think span is the tokens
   strictly between the two tags.
3. Inside the think span, boundaries are placed at ``### Step`` headers (at the header, including the
   spaces/tabs right before it; the header belongs to the step it starts); with no header, after each
   blank-line run ``\\n\\s*\\n``; with neither, after each ``\\n``. Each boundary maps to the first cut at
   or after it (a vocabulary that glues ``\\n#`` into one token leaves that token in the previous step;
   Qwen2-style pre-tokenizers never do). A boundary that lands inside an image/grounding span (the model
   adapter's ``atomic_pairs``; Qwen-VL's: ``<|vision_start|>…<|vision_end|>``, ``<|box_start|>…<|box_end|>``,
   ``<|object_ref_start|>…<|object_ref_end|>``, ``<|quad_start|>…<|quad_end|>``; an unclosed one runs
   to the end) moves to the cut after its end.
4. Pieces are merged: whitespace-only pieces before the first step are left out (not a step); text
   before the first header is a step of its own when it is long enough (a "preamble" step), otherwise
   it is merged into the next piece like any short first piece; a piece whose stripped text has fewer
   than ``min_step_chars`` characters is merged into the previous step; the first step absorbs following
   pieces until it is long enough (a single short step is kept: non-blank think text always gives
   ``K >= 1``); ``K`` is capped at ``max_steps`` by merging the tail into the last step.

Decisions (each a :class:`StepConfig` option):

* No ``<think>`` -> ``K = 0`` (``think is None``), unless ``open_in_prompt`` says the prompt ended with
  the opener, in which case the think span starts at token 0.
* ``<think>`` without ``</think>``: the think span runs to the ``<answer>`` tag if one follows, else to
  the end of the completion (trailing EOS/pad tokens excluded), and ``think_close is None``. The MIG probe
  stays well defined: the scorer appends ``</think>\\n<answer>`` + gold answer after the end of step k,
  which is always the end of a step. Set ``require_close=True`` to get ``K = 0`` instead.
* The answer span needs both ``<answer>`` and ``</answer>`` (searched after the think span); otherwise
  ``answer is None`` (an unclosed answer is never graded).
* Image/grounding spans inside the think span stay inside the step that contains them (they are atomic,
  never cut); their token spans are returned in ``StepSpans.atomic`` for callers that want to mask them.

Token classes: every valid (non-padding) token is in exactly one of: a step; whitespace left before the
first step (or a blank think span); a tag span; the answer span; or "other" (text before ``<think>``,
between ``</think>`` and ``<answer>``, after ``</answer>``, EOS).
"""

from __future__ import annotations

import bisect
import json
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Any

import torch

from vlm_mig.adapter import QWEN_VL_ATOMIC_PAIRS
from vlm_mig.mig import MigOptions
from vlm_mig.prompts import ANSWER_CLOSE, ANSWER_OPEN, STEP_HEADER, THINK_CLOSE, THINK_OPEN

Span = tuple[int, int]


@dataclass(frozen=True)
class StepConfig:
    """Options of the step segmenter (SPEC.md section 1)."""

    min_step_chars: int = MigOptions.min_step_chars  #: a piece whose stripped text is shorter merges into a neighbour
    max_steps: int = MigOptions.max_steps  #: cap on K; steps past the cap are merged into the last one
    header: str = STEP_HEADER  #: step header that starts a step (first split rule)
    think_tags: tuple[str, str] = (THINK_OPEN, THINK_CLOSE)  #: opening/closing tags of the reasoning
    answer_tags: tuple[str, str] = (ANSWER_OPEN, ANSWER_CLOSE)  #: opening/closing tags of the answer
    #: (start, end) markers of spans never cut: the model's (``adapter_for(model).atomic_pairs``); Qwen-VL's by default
    atomic_pairs: tuple[tuple[str, str], ...] = QWEN_VL_ATOMIC_PAIRS
    open_in_prompt: bool = False  #: the prompt ends with the think opener: the completion starts inside it
    require_close: bool = False  #: ``<think>`` without ``</think>`` gives K = 0 (default: runs to the end)

    @classmethod
    def of(cls, options: MigOptions, **kwargs: Any) -> StepConfig:
        """The segmenter a run's scoring options ask for (``kwargs``: the other fields, e.g. ``atomic_pairs``)."""
        return cls(min_step_chars=options.min_step_chars, max_steps=options.max_steps, **kwargs)

    def __post_init__(self):
        if self.min_step_chars < 0:
            raise ValueError(f"min_step_chars must be >= 0, got {self.min_step_chars}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.header:
            raise ValueError("header must be a non-empty string")
        for name, pair in (("think_tags", self.think_tags), ("answer_tags", self.answer_tags)):
            if len(pair) != 2 or not all(pair):
                raise ValueError(f"{name} must be two non-empty strings, got {pair!r}")


@dataclass
class StepSpans:
    """Token spans of one completion; every span is ``(start, end)``, half-open, completion-relative."""

    steps: list[Span]  #: S_1..S_K, sorted, disjoint, contiguous (they tile think[start of S_1]..think end)
    think: Span | None  #: tokens strictly between ``<think>`` and ``</think>`` (None: no think span)
    answer: Span | None  #: tokens strictly between ``<answer>`` and ``</answer>`` (None: not both found)
    think_open: Span | None = None  #: tokens of the ``<think>`` tag (None when absent or in the prompt)
    think_close: Span | None = None  #: tokens of ``</think>`` (None when the think span is unclosed)
    answer_open: Span | None = None  #: tokens of ``<answer>``
    answer_close: Span | None = None  #: tokens of ``</answer>``
    atomic: list[Span] = field(default_factory=list)  #: image/grounding spans (never cut by a boundary)
    length: int = 0  #: number of valid completion tokens (padding excluded)
    texts: list[str] = field(default_factory=list)  #: decoded text of each step, for display

    @property
    def K(self) -> int:
        """Number of steps."""
        return len(self.steps)

    @property
    def prefix_ends(self) -> list[int]:
        """The K+1 cut points of the MIG probe: prefix k is completion tokens ``[0, prefix_ends[k])``.

        ``prefix_ends[0]`` is the start of the think span (the empty think opener), ``prefix_ends[k]``
        the end of step k. Empty when there is no think span.
        """
        if self.think is None:
            return []
        return [self.think[0]] + [e for _, e in self.steps]

    def step_index(self, length: int | None = None, offset: int = 0) -> list[int]:
        """Per-token step index (0-based; -1 for tokens outside every step), of ``length`` tokens, with the
        spans shifted right by ``offset``."""
        n = self.length if length is None else length
        out = [-1] * n
        for k, (s, e) in enumerate(self.steps):
            s, e = min(s + offset, n), min(e + offset, n)
            out[s:e] = [k] * (e - s)
        return out


# --------------------------------------------------------------------------------------------------
# Token ids -> bytes


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table used by ByteLevel pre-tokenizers."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}
_ID_ERRORS = (OverflowError, IndexError, KeyError, TypeError, ValueError)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_mode(tok: Any) -> str:
    """``bytelevel``, ``metaspace`` (SentencePiece ``▁`` + ``<0xNN>``) or ``decode`` (per-token decode)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None and hasattr(tok, "id_to_token") and hasattr(tok, "decoder"):
        backend = tok  # a raw ``tokenizers.Tokenizer``
    dec = getattr(backend, "decoder", None) if backend is not None else None
    if dec is not None:
        try:
            state = dec.__getstate__()
            state = state.decode() if isinstance(state, bytes) else json.dumps(state)
        except (AttributeError, TypeError, ValueError):  # pragma: no cover - exotic decoders
            state = type(dec).__name__
        if '"ByteLevel"' in state or state == "ByteLevel":
            return "bytelevel"
        if "ByteFallback" in state or "Metaspace" in state or "\u2581" in state or "\\u2581" in state:
            return "metaspace"
    if getattr(tok, "byte_decoder", None):  # slow GPT-2 style tokenizers
        return "bytelevel"
    return "decode"


class TokenBytes:
    """Exact bytes of each token id for one tokenizer (cached per id; build once, reuse).

    Added/special tokens map to their content; ids the tokenizer does not know (a model vocabulary padded
    past the tokenizer's) map to ``b""``.
    """

    def __init__(self, tokenizer: Any):
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # accept a processor
        self.tokenizer = tok
        self.mode = _decoder_mode(tok)
        self._cache: dict[int, bytes] = {}
        added = getattr(tok, "added_tokens_decoder", None)
        if added is None and hasattr(tok, "get_added_tokens_decoder"):
            added = tok.get_added_tokens_decoder()
        for i, at in (added or {}).items():
            self._cache[int(i)] = str(getattr(at, "content", at)).encode("utf-8")

    def _token_strings(self, ids: list[int]) -> list[str | None]:
        tok = self.tokenizer
        conv = getattr(tok, "convert_ids_to_tokens", None)
        if conv is not None:
            try:
                return list(conv(ids))
            except _ID_ERRORS:  # e.g. a negative id; retry one by one
                out: list[str | None] = []
                for i in ids:
                    try:
                        out.append(conv(i))
                    except _ID_ERRORS:
                        out.append(None)
                return out
        out = []
        for i in ids:
            try:
                out.append(tok.id_to_token(i))
            except _ID_ERRORS:
                out.append(None)
        return out

    def _fill(self, ids: list[int]) -> None:
        strings = self._token_strings(ids)
        for i, s in zip(ids, strings):
            if s is None:
                b = b""
            elif self.mode == "bytelevel":
                try:
                    b = bytes(_BYTE_DECODER[c] for c in s)
                except KeyError:
                    b = s.encode("utf-8")
            elif self.mode == "metaspace":
                m = _BYTE_FALLBACK.fullmatch(s)
                b = bytes([int(m.group(1), 16)]) if m else s.replace("\u2581", " ").encode("utf-8")
            else:
                b = self.tokenizer.decode([i]).encode("utf-8")
            self._cache[i] = b

    def __call__(self, ids: Sequence[int]) -> list[bytes]:
        """The bytes of each id, in order."""
        cache = self._cache
        missing = [i for i in set(ids) if i not in cache]
        if missing:
            self._fill(missing)
        return [cache[i] for i in ids]


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES_STRONG: dict[int, tuple[Any, TokenBytes]] = {}


def token_bytes(tokenizer: Any) -> TokenBytes:
    """The cached :class:`TokenBytes` of ``tokenizer`` (a fast/slow tokenizer, processor or raw Tokenizer)."""
    if isinstance(tokenizer, TokenBytes):
        return tokenizer
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    try:
        table = _TABLES.get(tok)
        if table is None:
            table = _TABLES[tok] = TokenBytes(tok)
        return table
    except TypeError:  # not weak-referenceable: key by id, keep the object alive with its table
        hit = _TABLES_STRONG.get(id(tok))
        if hit is None or hit[0] is not tok:
            hit = _TABLES_STRONG[id(tok)] = (tok, TokenBytes(tok))
        return hit[1]


# --------------------------------------------------------------------------------------------------
# Segmentation


_REGEX_CACHE: dict[tuple, tuple[re.Pattern, re.Pattern | None]] = {}
_BLANK = re.compile(rb"\n\s*\n")
_NEWLINE = re.compile(rb"\n")


def _patterns(cfg: StepConfig) -> tuple[re.Pattern, re.Pattern | None]:
    key = (cfg.header, cfg.atomic_pairs)
    hit = _REGEX_CACHE.get(key)
    if hit is None:
        header = re.compile(rb"[ \t]*" + re.escape(cfg.header.encode("utf-8")))
        alts = [
            re.escape(a.encode("utf-8")) + rb".*?(?:" + re.escape(b.encode("utf-8")) + rb"|\Z)"
            for a, b in cfg.atomic_pairs
        ]
        atomic = re.compile(b"|".join(alts), re.DOTALL) if alts else None
        hit = _REGEX_CACHE[key] = (header, atomic)
    return hit


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def _stop_ids(tokenizer: Any) -> frozenset[int]:
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    out = set()
    for name in ("eos_token_id", "pad_token_id"):
        v = getattr(tok, name, None)
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(int(x) for x in v)
    return frozenset(out)


def segment(
    ids: Sequence[int] | torch.Tensor,
    tokenizer: Any,
    *,
    length: int | None = None,
    pad_id: int | None = None,
    config: StepConfig | None = None,
    stop_ids: Iterable[int] | None = None,
) -> StepSpans:
    """Segment one completion into steps; return its :class:`StepSpans` (see the module docstring).

    ``ids``: the completion's token ids (list or 1-D tensor), possibly followed by padding. ``length``:
    the number of valid tokens (wins over ``pad_id``); else trailing ``pad_id`` tokens are dropped.
    ``tokenizer``: the tokenizer (or processor, or a :class:`TokenBytes`) that produced the ids.
    ``stop_ids``: tokens left out of an unclosed think span's end (default: the tokenizer's EOS and pad).
    """
    cfg = config or StepConfig()
    id_list = _as_id_list(ids)
    if length is not None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        id_list = id_list[:length]
    elif pad_id is not None:
        n = len(id_list)
        while n and id_list[n - 1] == pad_id:
            n -= 1
        id_list = id_list[:n]
    n = len(id_list)
    table = token_bytes(tokenizer)
    pieces = table(id_list)
    starts = [0, *accumulate(len(p) for p in pieces)]  # n + 1 entries; starts[n] = total bytes
    text = b"".join(pieces)
    total = len(text)

    # Cuts: token indices whose start is a UTF-8 character boundary (0 and n always).
    cut_idx = [0]
    for i in range(1, n):
        p = starts[i]
        if p < total and (text[p] & 0xC0) == 0x80:
            continue
        cut_idx.append(i)
    if n:
        cut_idx.append(n)
    cut_pos = [starts[i] for i in cut_idx]

    def after(b: int) -> int:  # first cut at or after byte b
        j = bisect.bisect_left(cut_pos, b)
        return cut_idx[j] if j < len(cut_idx) else n

    def before(b: int) -> int:  # last cut at or before byte b
        j = bisect.bisect_right(cut_pos, b) - 1
        return cut_idx[j] if j >= 0 else 0

    t_open, t_close = (t.encode("utf-8") for t in cfg.think_tags)
    a_open, a_close = (t.encode("utf-8") for t in cfg.answer_tags)

    think_open = think_close = answer_open = answer_close = think = answer = None
    lo = 0  # running token index: spans are assigned left to right, never overlapping
    search_from = 0  # byte offset where the answer search starts
    content: tuple[int, int] | None = None  # think content as token indices
    if cfg.open_in_prompt:
        c0, open_end_b = 0, 0
    else:
        ob = text.find(t_open)
        if ob < 0:
            c0 = open_end_b = -1
        else:
            s = before(ob)
            open_end_b = ob + len(t_open)
            c0 = max(s, after(open_end_b))
            think_open = (s, c0)
    if open_end_b >= 0:
        lo = c0
        cb = text.find(t_close, open_end_b)
        if cb >= 0:
            c1 = max(c0, before(cb))
            e = max(c1, after(cb + len(t_close)))
            think_close = (c1, e)
            content = (c0, c1)
            lo, search_from = e, cb + len(t_close)
        elif not cfg.require_close:
            ab = text.find(a_open, open_end_b)
            if ab >= 0:
                c1 = max(c0, before(ab))
                search_from = ab
            else:
                stops = _stop_ids(tokenizer) if stop_ids is None else frozenset(stop_ids)
                c1 = n
                while c1 > c0 and id_list[c1 - 1] in stops:
                    c1 -= 1
                search_from = total
            content = (c0, c1)
            lo = c1
    if content is not None:
        think = content

    ab = text.find(a_open, search_from) if search_from < total else -1
    if ab >= 0:
        ae_b = ab + len(a_open)
        cb = text.find(a_close, ae_b)
        if cb >= 0:
            s = max(lo, before(ab))
            a0 = max(s, after(ae_b))
            a1 = max(a0, before(cb))
            e = max(a1, after(cb + len(a_close)))
            answer_open, answer, answer_close = (s, a0), (a0, a1), (a1, e)

    header_re, atomic_re = _patterns(cfg)
    atomic: list[Span] = []
    if atomic_re is not None and b"<|" in text:
        for m in atomic_re.finditer(text):
            atomic.append((before(m.start()), after(m.end())))

    steps: list[Span] = []
    texts: list[str] = []
    if think is not None and think[1] > think[0]:
        c0, c1 = think
        p0, p1 = starts[c0], starts[c1]
        bounds = [m.start() for m in header_re.finditer(text, p0, p1)]
        if not bounds:
            bounds = [m.end() for m in _BLANK.finditer(text, p0, p1)]
            if not bounds:
                bounds = [m.end() for m in _NEWLINE.finditer(text, p0, p1)]
        cuts = [c0]
        for b in bounds:
            c = after(b)
            for s, e in atomic:  # atomic spans are few (usually none); sorted by start
                if s < c < e:
                    c = e
            if cuts[-1] < c < c1:
                cuts.append(c)
        cuts.append(c1)

        def stripped_len(a: int, b: int) -> int:
            return len(text[starts[a] : starts[b]].decode("utf-8", "replace").strip())

        min_chars = max(cfg.min_step_chars, 1)  # whitespace-only pieces are never steps
        merged: list[list[int]] = []
        pending: int | None = None
        for a, b in pairwise(cuts):
            if merged:
                if stripped_len(a, b) < min_chars:
                    merged[-1][1] = b
                else:
                    merged.append([a, b])
                continue
            if pending is None and stripped_len(a, b) == 0:
                continue  # whitespace before the first step: not a step
            start = a if pending is None else pending
            if stripped_len(start, b) >= min_chars:
                merged.append([start, b])
                pending = None
            else:
                pending = start
        if pending is not None:
            merged.append([pending, c1])
        if len(merged) > cfg.max_steps:
            merged[cfg.max_steps - 1][1] = merged[-1][1]
            del merged[cfg.max_steps :]
        steps = [(a, b) for a, b in merged]
        texts = [text[starts[a] : starts[b]].decode("utf-8", "replace") for a, b in steps]

    return StepSpans(
        steps=steps,
        think=think,
        answer=answer,
        think_open=think_open,
        think_close=think_close,
        answer_open=answer_open,
        answer_close=answer_close,
        atomic=atomic,
        length=n,
        texts=texts,
    )


def segment_batch(
    ids: torch.Tensor | Sequence[Sequence[int]],
    tokenizer: Any,
    *,
    lengths: Sequence[int] | torch.Tensor | None = None,
    pad_id: int | None = None,
    config: StepConfig | None = None,
    stop_ids: Iterable[int] | None = None,
) -> list[StepSpans]:
    """:func:`segment` over a batch of right-padded completions (2-D tensor or list of id lists).

    ``lengths`` (e.g. ``completion_mask.sum(1)``) gives each row's valid length; else trailing
    ``pad_id`` tokens are dropped.
    """
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
    if lengths is not None:
        lens = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
        if len(lens) != len(rows):
            raise ValueError(f"got {len(lens)} lengths for {len(rows)} completions")
    else:
        lens = [None] * len(rows)
    table = token_bytes(tokenizer)
    stops = _stop_ids(tokenizer) if stop_ids is None else frozenset(stop_ids)
    return [
        segment(r, table, length=None if n is None else int(n), pad_id=pad_id, config=config, stop_ids=stops)
        for r, n in zip(rows, lens)
    ]


# --------------------------------------------------------------------------------------------------
# Masks


def step_index(spans: Sequence[StepSpans], length: int, offset: int | Sequence[int] = 0) -> torch.Tensor:
    """``[B, length]`` long tensor: the 0-based step of each token, -1 for tokens outside every step.

    ``offset`` shifts each row's spans (e.g. the prompt length when the tensor covers prompt+completion).
    """
    offs = [offset] * len(spans) if isinstance(offset, int) else list(offset)
    rows = [sp.step_index(length, off) for sp, off in zip(spans, offs)]
    return torch.tensor(rows, dtype=torch.long).reshape(len(spans), length)


def cot_mask(spans: Sequence[StepSpans], length: int, offset: int | Sequence[int] = 0) -> torch.Tensor:
    """``[B, length]`` bool tensor: True on the tokens of the steps S_1..S_K (``M_cot`` of SPEC.md)."""
    return step_index(spans, length, offset) >= 0


def span_mask(spans: Sequence[StepSpans], length: int, which: str, offset: int | Sequence[int] = 0) -> torch.Tensor:
    """``[B, length]`` bool mask of one span field per row, e.g. ``"think"`` or ``"answer"``."""
    offs = [offset] * len(spans) if isinstance(offset, int) else list(offset)
    out = torch.zeros(len(spans), length, dtype=torch.bool)
    for b, (sp, off) in enumerate(zip(spans, offs)):
        span = getattr(sp, which)
        if span is not None:
            out[b, min(span[0] + off, length) : min(span[1] + off, length)] = True
    return out


__all__ = [
    "StepConfig",
    "StepSpans",
    "TokenBytes",
    "cot_mask",
    "segment",
    "segment_batch",
    "span_mask",
    "step_index",
    "token_bytes",
]

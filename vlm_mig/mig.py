"""The MIG math (SPEC section 2): step scores ``l_0..l_K`` -> monotonic watermark -> gains -> ``R_proc``.

For a rollout with prompt ``x`` and completion ``z``, the step score is

    l_k = max_{v in V(y*)} (1/|v|) sum_t log pi_old(v_t | x, S_1..S_k, probe, v_<t)

``vlm_mig.forward`` computes every ``l_k`` of a rollout in one packed pass; this module holds what turns
them into credit, as pure functions on tensors, and the tokenization of the probe and the answer forms the
pass scores (``encode_answers``).

Options (``MigOptions``; SPEC section 2 has each decision and its measurement): the probe and the answer
are tokenized as one text and split at the seam by character offsets (``encode_answers``), so each copy
holds the tokens the model would have written; ``l_0`` is scored right after ``<think>`` or after a neutral
opener; the answer's token log-probs become ``l_k`` by their mean, their sum, or with each number scored
by its least likely token, or as the gold's margin over its most likely competitor token (``answer_scores``);
the watermark is capped at the last step's score by default (``records: kept``: a record counts only as far as
the completion keeps it), or takes every record (``all``), or is switched off (raw ``l_k - l_{k-1}``); gains
below ``min_gain`` count as 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm_mig.fields import bounded, check_fields, choice
from vlm_mig.prompts import DEFAULT_L0_OPENER, DEFAULT_PROBE

#: How the gold answer's token log-probs become one score (SPEC section 2, "answer score").
ANSWER_SCORES = ("mean", "sum", "digits", "margin")
#: Which watermark records earn credit (SPEC section 2): every new record, or only what the last step keeps.
RECORDS = ("all", "kept")
#: Where l_0 is scored: right after ``<think>`` (an empty think), or after ``MigOptions.l0_opener``.
L0_CONTEXTS = ("empty_think", "opener")


@dataclass
class MigOptions:
    """How the process reward is computed (SPEC sections 1-2): the one place of these defaults, shared by the
    ``mig`` section of a training config (``config.MigConfig``), ``vlm-mig score`` (``score.ScoreConfig``) and
    the step segmenter (``steps.StepConfig``)."""

    probe: str = DEFAULT_PROBE  #: closes the reasoning and opens the answer when scoring l_k
    min_step_chars: int = bounded(8, ge=0)  #: steps shorter than this merge into a neighbour
    max_steps: int = bounded(16, ge=1)  #: cap on K; the tail merges into the last step
    visual_evidence: bool = False  #: also score l_0 without the image (one extra pass over the prompts, copy 0 only)
    max_tokens_per_batch: int = bounded(16384, ge=1)  #: bound on padded tokens of one packed scoring pass
    l0_context: str = choice("empty_think", L0_CONTEXTS)  #: l_0 right after <think> (empty_think) or after l0_opener
    l0_opener: str = DEFAULT_L0_OPENER  #: the neutral text after <think> that l_0 follows when l0_context is opener
    answer_score: str = choice("mean", ANSWER_SCORES)  #: answer token log-probs -> l_k (sum: sequence log-prob)
    watermark: bool = True  #: gains against the watermark (SPEC); false: raw l_k - l_{k-1} (ablation)
    min_gain: float = bounded(0.0, ge=0)  #: a gain below this many nats counts as 0 (the watermark moves only past it)
    #: "kept": a record earns only the part of it the completion keeps to its last step (h_k capped at l_K);
    #: "all": every new record earns its gain, even one a later step abandons
    records: str = choice("kept", RECORDS)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def opener(self) -> str | None:
        """The text copy 0 puts before the probe (``encode_answers``), None for an empty think."""
        return self.l0_opener if self.l0_context == "opener" else None


# --------------------------------------------------------------------------------------------------
# Pure math on tensors


def watermark(scores: torch.Tensor, valid: torch.Tensor | None = None, min_gain: float = 0.0) -> torch.Tensor:
    """Monotonic historical watermark ``h_0 = l_0, h_k = max(h_{k-1}, l_k)`` along the last dim.

    ``scores``: [..., K+1]; ``valid``: same shape, False past each row's K (those entries repeat h_K).
    With ``min_gain > 0`` a record must beat the watermark by at least ``min_gain`` to move it
    (``h_k = l_k if l_k - h_{k-1} >= min_gain else h_{k-1}``), so score noise never earns credit while a
    slow climb still does once it adds up to ``min_gain``.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    if min_gain <= 0:
        h = torch.cummax(scores, dim=-1).values
    else:
        cols = [scores[..., 0]]
        for k in range(1, scores.shape[-1]):
            cols.append(torch.where(scores[..., k] - cols[-1] >= min_gain, scores[..., k], cols[-1]))
        h = torch.stack(cols, dim=-1)
    if valid is not None:
        # -inf entries past K are filled with h_K already; only an all-invalid row stays -inf.
        h = torch.where(torch.isinf(h), torch.zeros_like(h), h)
    return h


def final_score(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``l_K`` of each row ([...]): the last real entry of ``scores`` [..., K+1]."""
    if valid is None:
        return scores[..., -1]
    last = (valid.long().sum(-1, keepdim=True) - 1).clamp(min=0)
    return scores.gather(-1, last).squeeze(-1)


def credited_watermark(scores: torch.Tensor, valid: torch.Tensor | None = None, min_gain: float = 0.0,
                       records: str = MigOptions.records) -> torch.Tensor:
    """The watermark the gains are read from: ``watermark`` itself, or with ``records="kept"`` capped at the
    last step's score, ``h'_k = min(h_k, l_K)``."""
    if records not in RECORDS:
        raise ValueError(f"records must be one of {RECORDS}, got {records!r}")
    h = watermark(scores, valid, min_gain)
    return torch.minimum(h, final_score(scores, valid).unsqueeze(-1)) if records == "kept" else h


def step_gains(scores: torch.Tensor, valid: torch.Tensor | None = None, *, use_watermark: bool = True,
               min_gain: float = 0.0, records: str = MigOptions.records) -> torch.Tensor:
    """MIG per step, shape [..., K] (0 past each row's K).

    With the watermark (SPEC): ``g_k = h_k - h_{k-1}``, i.e. ``max(0, l_k - h_{k-1})`` when ``min_gain`` is 0.
    ``records="kept"`` caps the watermark at the last step's score, ``h'_k = min(h_k, l_K)``: a record earns
    only as much of its gain as the completion keeps to its end, so ``R_proc = max(0, l_K - l_0)`` and a step
    that made the gold likely earns nothing when a later step abandons it. Without the watermark (the
    ablation): the raw difference ``l_k - l_{k-1}``, which can be negative (so it charges a drop by itself),
    set to 0 where ``|l_k - l_{k-1}| < min_gain``; ``records`` does not apply.
    """
    if use_watermark:
        h = credited_watermark(scores, valid, min_gain, records)
        g = h[..., 1:] - h[..., :-1]
    else:
        g = scores[..., 1:] - scores[..., :-1]
        g = torch.where(g.abs() < min_gain, torch.zeros_like(g), g)
    if valid is not None:
        g = g.masked_fill(~valid[..., 1:], 0.0)
    return g


def process_reward(scores: torch.Tensor, valid: torch.Tensor | None = None, *, use_watermark: bool = True,
                   min_gain: float = 0.0, records: str = MigOptions.records) -> torch.Tensor:
    """``R_proc = sum_k g_k`` (= ``h_K - h_0``; ``max(0, l_K - l_0)`` with ``records="kept"``; ``l_K - l_0``
    without the watermark); rows with K = 0 give 0."""
    return step_gains(scores, valid, use_watermark=use_watermark, min_gain=min_gain, records=records).sum(-1)


def answer_scores(logprobs: torch.Tensor, copy: torch.Tensor, n_copies: int, mode: str = MigOptions.answer_score,
                  unit: torch.Tensor | None = None) -> torch.Tensor:
    """One score per copy from the log-probs of its answer tokens (``copy[j]``: the copy of token j).

    ``mean``: ``(1/|v|) sum_t log p(v_t | ...)`` (SPEC); ``sum``: ``log p(v | ...)``, the whole answer's
    sequence log-prob; ``digits``: as ``mean``, but the tokens of one number (the same ``unit`` id within a
    copy) count as one unit scored by its least likely token, so a leading digit that a wrong stated number
    shares with the gold earns nothing while a later digit is unlikely. ``unit``: per token, an id that
    tokens of one number share (``encode_answers``); None makes every token its own unit. ``margin`` is the
    mean over tokens too, of log-prob margins (``packed_forward`` passes ``log p(v_t) - max_{u != v_t} log
    p(u)`` as ``logprobs``): the gold against its most likely competitor.
    """
    if mode not in ANSWER_SCORES:
        raise ValueError(f"answer score must be one of {ANSWER_SCORES}, got {mode!r}")
    if mode == "digits" and unit is not None and logprobs.numel():
        span = int(unit.max()) + 1
        keys, inverse = torch.unique(copy * span + unit, return_inverse=True)
        worst = logprobs.new_full((keys.numel(),), float("inf")).scatter_reduce(0, inverse, logprobs, "amin")
        logprobs, copy = worst, keys // span
    mode = "mean" if mode == "margin" else mode
    sums = logprobs.new_zeros(n_copies).index_add(0, copy, logprobs)
    if mode == "sum":
        return sums
    return sums / torch.bincount(copy, minlength=n_copies).clamp_min(1).to(sums.dtype)


def encode_probe(tok, probe: str) -> torch.Tensor:
    """The probe's own ids: what a copy holds before its answer when no answer form gave its own context."""
    return torch.tensor(tok.encode(probe, add_special_tokens=False), dtype=torch.long)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def encode_answers(tok, variants: Sequence[str], probe: str, opener: str | None = None) -> dict:
    """``ScoreRow`` fields for the answer forms ``V(y*)``: ``probe + v`` is tokenized as ONE text and split
    at the seam by character offsets, so a token the tokenizer merges across the seam (SmolLM2 writes
    ``>\\`` for ``<answer>\\frac``) is kept, as an answer token: the copy holds the tokens the model would
    have written. With ``opener``, copy 0 gets ``opener + probe + v`` the same way (``l0_context: opener``).
    Also gives each answer token its number unit (tokens overlapping one number share an id) for
    ``answer_score: digits``. Returns ``variants``, ``probes``, ``l0_probes`` and ``units``.
    """

    def split(prefix: str, v: str) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        try:
            enc = tok(prefix + v, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as e:
            raise ValueError(f"{type(tok).__name__} gives no character offsets; MIG scoring needs a fast "
                             "tokenizer to split probe and answer at their seam") from e
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        seam = len(prefix)
        # The answer starts at the first token that ends past the seam (it may start before it).
        a = next((i for i, (_, end) in enumerate(offsets) if end > seam), len(ids))
        if a == len(ids):
            raise ValueError(f"answer {v!r} has no tokens after probe {prefix!r}")
        ids = torch.tensor(ids, dtype=torch.long)
        return ids[:a], ids[a:], [(max(s0, seam) - seam, e - seam) for s0, e in offsets[a:]]

    out: dict[str, list] = {"variants": [], "probes": [], "l0_probes": [] if opener is not None else None,
                            "units": []}
    for v in variants:
        if not v:
            raise ValueError("an answer variant is empty")
        ctx, ans, spans = split(probe, v)
        out["variants"].append(ans)
        out["probes"].append(ctx)
        if opener is not None:
            ctx0, ans0, _ = split(opener + probe, v)
            if not torch.equal(ans0, ans):
                raise ValueError(f"mig.l0_opener {opener!r} changes how answer {v!r} tokenizes after the probe")
            out["l0_probes"].append(ctx0)
        numbers = [m.span() for m in _NUMBER.finditer(v)]
        hits = [next((n for n, (ns, ne) in enumerate(numbers) if s0 < ne and ns < e), None) for s0, e in spans]
        units: list[int] = []
        for j, hit in enumerate(hits):
            # A token continues the previous one's unit when both overlap the same number.
            units.append(units[-1] if j and hit is not None and hit == hits[j - 1] else j)
        out["units"].append(torch.tensor(units, dtype=torch.long))
    return out

"""Step scores ``l_0..l_K`` from one packed forward pass, the monotonic watermark, MIG gains, ``R_proc``.

SPEC.md section 2. For a rollout with prompt ``x`` and completion ``z``, the step score is

    l_k = max_{v in V(y*)} (1/|v|) sum_t log pi_old(v_t | x, S_1..S_k, probe, v_<t)

All ``l_k`` of a rollout come from ONE forward pass over the packed row

    [x][z (the whole completion)][probe+v copy (k=0, v_0)] ... [probe+v copy (k=K, v_last)]

under a float additive block mask: the completion attends causally as usual, and copy ``(k, v)`` sees the
row up to the end of ``S_k`` (the cut ``c_k``) and itself, never another copy. Each copy gets the position ids
the probe would have had if appended right after ``S_k`` (for M-RoPE: the text id after the cut token + 1),
so the pass equals K+1 separate passes to float tolerance. The same pass yields ``log pi_old`` of every
completion token. Image features are computed once per prompt and shared by all rollouts of its group.
Only scored positions get fp32 log-softmax, chunked, never full-vocabulary logits for the whole row.

Options (``MigOptions``; SPEC section 2 has each decision and its measurement): the probe and the answer
are tokenized as one text and split at the seam by character offsets (``encode_answers``), so each copy
holds the tokens the model would have written; ``l_0`` is scored right after ``<think>`` or after a neutral
opener; the answer's token log-probs become ``l_k`` by their mean, their sum, or with each number scored
by its least likely token, or as the gold's margin over its most likely competitor token (``answer_scores``);
the watermark is capped at the last step's score by default (``records: kept``: a record counts only as far as
the completion keeps it), or takes every record (``all``), or is switched off (raw ``l_k - l_{k-1}``); gains
below ``min_gain`` count as 0. The completion log-probs are taken at the rollout temperature, the ``l_k`` at 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from vlm_mig.adapter import adapter_for
from vlm_mig.fields import bounded, check_fields, choice
from vlm_mig.prompts import DEFAULT_L0_OPENER, DEFAULT_PROBE

#: How the gold answer's token log-probs become one score (SPEC section 2, "answer score").
ANSWER_SCORES = ("mean", "sum", "digits", "margin")
#: Which watermark records earn credit (SPEC section 2): every new record, or only what the last step keeps.
RECORDS = ("all", "kept")
#: Where l_0 is scored: right after ``<think>`` (an empty think), or after ``MigOptions.l0_opener``.
L0_CONTEXTS = ("empty_think", "opener")
#: No tokens: the probe of a pass that scores completions only (no answer copies).
EMPTY = torch.zeros(0, dtype=torch.long)
#: Scored positions per fp32 log-softmax: bounds the [chunk, vocabulary] logits held at once.
LOGPROB_CHUNK = 2048


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


# --------------------------------------------------------------------------------------------------
# What one rollout needs to be scored


@dataclass
class ScoreRow:
    """One rollout, as token ids (nothing here is re-tokenized)."""

    prompt_ids: torch.Tensor  #: [P] prompt ids without padding
    prompt_positions: torch.Tensor  #: [3, P] M-RoPE ids (VLMs) or [P] (text models), as the full sequence has them
    completion_ids: torch.Tensor  #: [T] completion ids through EOS, without padding
    cuts: list[int]  #: completion-relative prefix ends c_0..c_K (c_0 = start of the think content)
    variants: list[torch.Tensor]  #: token ids of each answer surface form in V(y*)
    image_embeds: torch.Tensor | None = None  #: [n image tokens, H] features for the prompt's image tokens
    #: per variant, the ids before its answer in every copy (the probe as tokenized together with that
    #: answer, ``encode_answers``); None: the shared ``probe_ids`` of the pass
    probes: list[torch.Tensor] | None = None
    #: per variant, the ids before its answer in copy 0 (opener + probe); None: as in the other copies
    l0_probes: list[torch.Tensor] | None = None
    #: per variant, a unit id per answer token (the tokens of one number share one), for ``digits``
    units: list[torch.Tensor] | None = None


@dataclass
class RowScores:
    """What the packed pass yields for one rollout."""

    l: torch.Tensor  #: [K+1] step scores (max over variants)
    l_variants: torch.Tensor  #: [K+1, |V|] per-variant scores
    completion_logprobs: torch.Tensor  #: [T] log pi_old of each completion token
    #: [K+1] step scores under every answer score of ``ANSWER_SCORES`` (``l`` is one of them)
    l_by_score: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PackedLayout:
    """Token layout of one packed row (all indices absolute within the row)."""

    ids: torch.Tensor  #: [L]
    positions: torch.Tensor  #: [3, L] or [L]
    visible: torch.Tensor  #: [L] last base index a token may attend to (base tokens: itself)
    copy_id: torch.Tensor  #: [L] -1 for base tokens, else the copy's index
    completion_src: torch.Tensor  #: [T] positions whose next-token logits predict each completion token
    completion_tgt: torch.Tensor  #: [T] the completion token ids
    answer_src: torch.Tensor  #: [n answer tokens over all copies] positions predicting each answer token
    answer_tgt: torch.Tensor  #: the answer token ids
    answer_copy: torch.Tensor  #: copy index of each answer token
    answer_unit: torch.Tensor  #: unit id of each answer token within its copy (``answer_scores``)
    n_copies: int
    n_variants: int


def layout_row(row: ScoreRow, probe_ids: torch.Tensor) -> PackedLayout:
    """Lay out ``[x][z][copies]`` with explicit positions and per-token visibility (pure, no model).

    Index bookkeeping runs on the CPU whatever device the inputs live on; the forward moves the result."""
    prompt_ids, completion_ids = row.prompt_ids.cpu(), row.completion_ids.cpu()
    probe_ids = probe_ids.cpu()
    P, T = prompt_ids.numel(), completion_ids.numel()
    mrope = row.prompt_positions.dim() == 2
    pp = row.prompt_positions.cpu() if mrope else row.prompt_positions.cpu().unsqueeze(0)
    # Text after the prompt continues from the largest id so far (as get_rope_index does after images).
    start = int(pp.max()) + 1 if P else 0
    comp_pos = torch.arange(start, start + T).unsqueeze(0).expand(pp.shape[0], T)
    base_pos = torch.cat([pp, comp_pos], dim=1)

    ids, pos, vis, cid = [prompt_ids, completion_ids], [base_pos], [torch.arange(P + T)], [
        torch.full((P + T,), -1, dtype=torch.long)]
    ans_src, ans_tgt, ans_copy, ans_unit = [], [], [], []
    offset = P + T
    copy = 0
    for k, c in enumerate(row.cuts):
        if not 0 <= c <= T:
            raise ValueError(f"cut {c} outside the completion (length {T})")
        last = P + c - 1  # last token the copy may see
        nxt = int(base_pos[:, last].max()) + 1 if last >= 0 else 0
        contexts = row.l0_probes if k == 0 and row.l0_probes is not None else row.probes
        for j, v in enumerate(row.variants):
            v = v.cpu()
            if v.numel() == 0:
                raise ValueError("an answer variant has no tokens")
            ctx = probe_ids if contexts is None else contexts[j].cpu()
            n_ctx = ctx.numel()
            seq = torch.cat([ctx, v])
            n = seq.numel()
            ids.append(seq)
            pos.append(torch.arange(nxt, nxt + n).unsqueeze(0).expand(pp.shape[0], n))
            vis.append(torch.full((n,), last, dtype=torch.long))
            cid.append(torch.full((n,), copy, dtype=torch.long))
            # Answer token j is predicted by the copy token before it. For j = 0 that is the last probe
            # token; with no probe it is the last token of prefix k, whose base state sees exactly prefix k.
            first = offset + n_ctx - 1 if n_ctx else last
            if first < 0:
                raise ValueError("an empty probe after an empty prefix: nothing predicts the first answer token")
            ans_src.append(torch.cat([torch.tensor([first]), offset + n_ctx + torch.arange(v.numel() - 1)]))
            ans_tgt.append(v)
            ans_copy.append(torch.full((v.numel(),), copy, dtype=torch.long))
            ans_unit.append(torch.arange(v.numel()) if row.units is None else row.units[j].cpu())
            offset += n
            copy += 1
    positions = torch.cat(pos, dim=1)
    empty = torch.zeros(0, dtype=torch.long)
    return PackedLayout(
        ids=torch.cat(ids),
        positions=positions if mrope else positions[0],
        visible=torch.cat(vis),
        copy_id=torch.cat(cid),
        completion_src=P - 1 + torch.arange(T),
        completion_tgt=completion_ids,
        answer_src=torch.cat(ans_src) if ans_src else empty,
        answer_tgt=torch.cat(ans_tgt) if ans_tgt else empty,
        answer_copy=torch.cat(ans_copy) if ans_copy else empty,
        answer_unit=torch.cat(ans_unit) if ans_unit else empty,
        n_copies=copy,
        n_variants=len(row.variants),
    )


def block_mask(layouts: list[PackedLayout], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Float additive 4D mask [B, 1, L, L] (0 = attend, dtype min = blocked) for right-padded packed rows.

    A base token attends causally to the base; a copy token attends to the base up to its cut and causally
    within its own copy. Padding rows attend to themselves only, so no softmax row is empty (no NaN).
    """
    B = len(layouts)
    visible = torch.full((B, length), -1, dtype=torch.long)
    copy_id = torch.full((B, length), -2, dtype=torch.long)  # -2 marks padding
    for i, lay in enumerate(layouts):
        n = lay.ids.numel()
        visible[i, :n] = lay.visible
        copy_id[i, :n] = lay.copy_id
    idx = torch.arange(length)
    q_vis = visible.unsqueeze(2)  # [B, L, 1]
    k_is_base = (copy_id == -1).unsqueeze(1)  # [B, 1, L]
    allowed = k_is_base & (idx.view(1, 1, -1) <= q_vis)
    same_copy = (copy_id.unsqueeze(2) == copy_id.unsqueeze(1)) & (copy_id >= 0).unsqueeze(1)
    allowed |= same_copy & (idx.view(1, 1, -1) <= idx.view(1, -1, 1))
    allowed |= torch.eye(length, dtype=torch.bool).unsqueeze(0) & (copy_id == -2).unsqueeze(2)
    mask = torch.zeros(B, 1, length, length, dtype=dtype)
    return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------------
# The model-facing pass


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOGPROB_CHUNK,
                   temperature: float = 1.0, rival: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``log p(target)`` for each row of ``hidden`` [N, H], in chunks (never all logits at once), under
    ``softmax(logits / temperature)``. With ``rival`` also ``max_{u != target} log p(u)``, the most likely
    other token (a pair of tensors)."""
    head = adapter_for(model).output_head(model)
    out, rivals = [], []

    def pick(logits: torch.Tensor, s: int) -> None:
        logp = (logits if temperature == 1.0 else logits / temperature).log_softmax(-1)
        tgt = targets[s : s + chunk].unsqueeze(-1)
        out.append(logp.gather(-1, tgt).squeeze(-1))
        if rival:
            top = logp.topk(min(2, logp.shape[-1]), dim=-1)
            other = top.values[:, -1] if top.values.shape[-1] > 1 else torch.full_like(top.values[:, 0], -math.inf)
            rivals.append(torch.where(top.indices[:, 0] == tgt.squeeze(-1), other, top.values[:, 0]))

    if hasattr(head.weight, "ds_id"):
        # ZeRO-3 partitions the weight: only the module call gathers it (and routes its gradient back to the
        # shards), so the logits come out in the engine's dtype and are upcast before the softmax.
        for s in range(0, hidden.shape[0], chunk):
            pick(head(hidden[s : s + chunk]).float(), s)
    else:
        # fp32 even under bf16 autocast: bf16 logits carry ~0.1 nats of noise, as large as a step's gain.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight = head.weight.float()
            bias = head.bias.float() if getattr(head, "bias", None) is not None else None
            for s in range(0, hidden.shape[0], chunk):
                pick(F.linear(hidden[s : s + chunk].float(), weight, bias), s)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    lp = torch.cat(out) if out else empty
    return (lp, torch.cat(rivals) if rivals else empty) if rival else lp


def packed_forward(model, rows: list[ScoreRow], probe_ids: torch.Tensor, logprob_chunk: int = LOGPROB_CHUNK,
                   answer_score: str = MigOptions.answer_score, temperature: float = 1.0) -> list[RowScores]:
    """Score a micro-batch of rollouts in one forward pass. Runs under the caller's grad mode.

    ``l`` uses ``answer_score``; ``l_by_score`` holds every answer score (they share the pass). The completion
    log-probs are those of the sampler, ``softmax(logits / temperature)`` (the rollout temperature), which the
    policy-gradient ratio needs; the step scores ``l_k`` are the model's own likelihoods (temperature 1), so a
    run's process reward does not change with its sampling temperature."""
    if answer_score not in ANSWER_SCORES:
        raise ValueError(f"answer score must be one of {ANSWER_SCORES}, got {answer_score!r}")
    device = next(model.parameters()).device
    layouts = [layout_row(r, probe_ids) for r in rows]
    L = max(lay.ids.numel() for lay in layouts)
    B = len(rows)
    mrope = rows[0].prompt_positions.dim() == 2
    ids = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros((3, B, L) if mrope else (B, L), dtype=torch.long)
    for i, lay in enumerate(layouts):
        n = lay.ids.numel()
        ids[i, :n] = lay.ids
        if mrope:
            pos[:, i, :n] = lay.positions
        else:
            pos[i, :n] = lay.positions
    ids, pos = ids.to(device), pos.to(device)
    adapter = adapter_for(model)
    embeds = adapter.input_embeddings(model)(ids)
    if any(r.image_embeds is not None for r in rows):
        embeds = _scatter_images(adapter.image_token_id(model), embeds, ids, rows)
    mask = block_mask(layouts, L, embeds.dtype).to(device)
    hidden = adapter.decoder(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    hidden = hidden.last_hidden_state

    def gather(src_of, tgt_of) -> tuple[torch.Tensor, torch.Tensor]:
        rows_, pos_ = zip(*[(torch.full_like(src_of(lay), i), src_of(lay)) for i, lay in enumerate(layouts)])
        flat = hidden[torch.cat(rows_).to(device), torch.cat(pos_).to(device)]
        return flat, torch.cat([tgt_of(lay) for lay in layouts]).to(device)

    # Every scored position of the micro-batch through one chunked fp32 log-softmax per kind: the completion
    # tokens at the sampling temperature, the answer tokens at 1 with their most likely rival (``margin``).
    comp_lp = token_logprobs(model, *gather(lambda lay: lay.completion_src, lambda lay: lay.completion_tgt),
                             logprob_chunk, temperature=temperature)
    ans_lp, ans_rival = token_logprobs(model, *gather(lambda lay: lay.answer_src, lambda lay: lay.answer_tgt),
                                       logprob_chunk, rival=True)

    results, c_cur, a_cur = [], 0, 0
    for row, lay in zip(rows, layouts):
        comp = comp_lp[c_cur : c_cur + lay.completion_src.numel()]
        c_cur += comp.numel()
        n_ans = lay.answer_tgt.numel()
        ans, rival = ans_lp[a_cur : a_cur + n_ans], ans_rival[a_cur : a_cur + n_ans]
        a_cur += n_ans
        copy_idx, unit = lay.answer_copy.to(device), lay.answer_unit.to(device)
        by_score, best = {}, {}
        for mode in ANSWER_SCORES:
            per_copy = answer_scores(ans - rival if mode == "margin" else ans, copy_idx, lay.n_copies, mode, unit)
            by_score[mode] = per_copy.view(len(row.cuts), lay.n_variants)
            best[mode] = (by_score[mode].max(-1).values if lay.n_variants
                          else by_score[mode].new_zeros(len(row.cuts)))
        results.append(RowScores(l=best[answer_score], l_variants=by_score[answer_score], completion_logprobs=comp,
                                 l_by_score=best))
    return results


def _scatter_images(image_token: int, embeds: torch.Tensor, ids: torch.Tensor, rows: list[ScoreRow]) -> torch.Tensor:
    """Place each row's precomputed image features at its prompt's image-token positions."""
    feats = []
    for i, r in enumerate(rows):
        n = int((ids[i, : r.prompt_ids.numel()] == image_token).sum())
        got = 0 if r.image_embeds is None else r.image_embeds.shape[0]
        if got != n:
            raise ValueError(f"row {i}: {n} image tokens in the prompt but {got} image feature rows")
        if n:
            feats.append(r.image_embeds.to(embeds.dtype))
    where = ids == image_token
    # Completions and copies never hold image tokens the scorer must fill: restrict to prompt spans.
    for i, r in enumerate(rows):
        where[i, r.prompt_ids.numel():] = False
    embeds = embeds.clone()
    embeds[where] = torch.cat(feats).to(embeds.device)
    return embeds


def score_rows(model, rows: list[ScoreRow], probe_ids: torch.Tensor,
               max_tokens_per_batch: int = MigOptions.max_tokens_per_batch, logprob_chunk: int = LOGPROB_CHUNK,
               answer_score: str = MigOptions.answer_score, temperature: float = 1.0) -> list[RowScores]:
    """Score any number of rollouts, micro-batched so no pass exceeds ``max_tokens_per_batch`` (padded
    rows x length, i.e. the attention mask is bounded by its square per row). ``temperature``: of the
    completion log-probs (``packed_forward``)."""

    def context(r: ScoreRow, k: int, j: int) -> int:
        ctx = r.l0_probes if k == 0 and r.l0_probes is not None else r.probes
        return (probe_ids if ctx is None else ctx[j]).numel()

    lengths = [
        r.prompt_ids.numel() + r.completion_ids.numel()
        + sum(context(r, k, j) + v.numel() for k in range(len(r.cuts)) for j, v in enumerate(r.variants))
        for r in rows
    ]
    out: list[RowScores | None] = [None] * len(rows)
    batch: list[int] = []
    longest = 0

    def run(batch: list[int]) -> None:
        for j, s in zip(batch, packed_forward(model, [rows[j] for j in batch], probe_ids, logprob_chunk,
                                              answer_score, temperature)):
            out[j] = s

    for i in sorted(range(len(rows)), key=lambda j: lengths[j]):
        if batch and max(longest, lengths[i]) * (len(batch) + 1) > max_tokens_per_batch:
            run(batch)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        run(batch)
    return out  # type: ignore[return-value]


def first_copy_rows(rows: list[ScoreRow]) -> list[ScoreRow]:
    """The rows cut down to copy 0 (l_0) and the completion tokens it can see: a cheap pass for l_0 alone."""
    return [replace(r, completion_ids=r.completion_ids[: r.cuts[0]], cuts=r.cuts[:1]) if r.cuts else r
            for r in rows]


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


def prompt_rows(model, batch) -> list[dict]:
    """Per-sample prompt pieces from a left-padded ``PromptBatch``: ids, exact position ids and image
    features (the vision tower runs once here for the whole batch). Rollouts of a group share them."""
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    pos = adapter.position_ids(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                               None if batch.mm_token_type_ids is None else batch.mm_token_type_ids.to(device),
                               None if batch.image_grid_thw is None else batch.image_grid_thw.to(device)).cpu()
    feats: list[torch.Tensor] = []
    if batch.pixel_values is not None:
        feats = adapter.image_features(model, batch.pixel_values.to(device), batch.image_grid_thw.to(device))
    out, img = [], 0
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        n_img = batch.images_per_sample[i] if batch.images_per_sample else 0
        embeds = torch.cat(feats[img : img + n_img]) if n_img else None
        img += n_img
        out.append({
            "prompt_ids": ids[i, keep],
            "prompt_positions": pos[:, i, keep] if pos.dim() == 3 else pos[i, keep],
            "image_embeds": embeds,
        })
    return out


def rollout_rows(model, rollouts, cuts: list[list[int]] | None = None,
                 answers: list[dict] | None = None) -> list[ScoreRow]:
    """``ScoreRow`` for every completion of a ``Rollouts`` batch; prompt pieces (and image features) are
    computed once per prompt and shared by the G rows of its group. ``answers[i]``: row i's answer fields
    (``encode_answers``); None scores no answer (completion log-probs only)."""
    prompts = prompt_rows(model, rollouts.prompts)
    lengths = rollouts.completion_mask.sum(-1).tolist()
    rows = []
    for i, n in enumerate(lengths):
        g = int(rollouts.group[i])
        rows.append(ScoreRow(
            completion_ids=rollouts.completion_ids[i, :n],
            cuts=cuts[i] if cuts is not None else [],
            **(answers[i] if answers is not None else {"variants": []}),
            **prompts[g],
        ))
    return rows


def blind_l0(model, processor, samples: list, rows: list[ScoreRow], probe_ids: torch.Tensor, template=None, *,
             row_sample: Sequence[int] | None = None, max_tokens_per_batch: int = MigOptions.max_tokens_per_batch,
             answer_score: str = MigOptions.answer_score,
             min_pixels: int | None = None, max_pixels: int | None = None) -> list[float | None]:
    """``l_0`` of each row with every image removed from its prompt (SPEC section 1, "visual evidence"):
    ``l_0`` minus this is what the image adds before any step. ``row_sample[i]`` is the index in ``samples``
    of row i's prompt (default: row i's own); each prompt is encoded once. None for rows without images, or
    whose prompt is given as ``messages`` (its images cannot be dropped without rewriting the chat)."""
    from vlm_mig.data.schema import Sample
    from vlm_mig.processing import encode_prompts, is_processor

    row_sample = list(range(len(rows))) if row_sample is None else list(row_sample)
    result: list[float | None] = [None] * len(rows)
    if not is_processor(processor):
        return result
    todo = sorted({row_sample[i] for i, r in enumerate(rows)
                   if r.cuts and samples[row_sample[i]].images and samples[row_sample[i]].question is not None})
    if not todo:
        return result
    blind = [Sample(id=s.id, answer=s.answer, task=s.task, answer_variants=s.answer_variants, question=s.question,
                    images=[]) for s in (samples[j] for j in todo)]
    pieces = dict(zip(todo, prompt_rows(model, encode_prompts(processor, blind, template, None, min_pixels,
                                                              max_pixels))))
    which = [i for i, r in enumerate(rows) if row_sample[i] in pieces and r.cuts]
    blind_rows = [replace(first_copy_rows([rows[i]])[0], **pieces[row_sample[i]]) for i in which]
    for i, sc in zip(which, score_rows(model, blind_rows, probe_ids, max_tokens_per_batch,
                                       answer_score=answer_score)):
        result[i] = float(sc.l[0])
    return result


def pad_rows(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Stack 1-D tensors into [B, length] (zeros after each), keeping the autograd graph."""
    out = rows[0].new_zeros(len(rows), length) if rows else torch.zeros(0, length)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def pad_scores(scores: list[RowScores]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``l_0..l_K`` as one [N, K_max + 1] tensor on the CPU (0 past a row's K; at least one column),
    and the mask of its real entries (what ``step_gains`` takes)."""
    ls = [s.l.detach().cpu() for s in scores]
    width = max(1, max(x.numel() for x in ls))
    valid = torch.arange(width) < torch.tensor([x.numel() for x in ls]).unsqueeze(1)
    return pad_rows(ls, width), valid


def pad_logprobs(scores: list[RowScores], length: int) -> torch.Tensor:
    """Stack per-row completion log-probs into [N, length] on the CPU, detached, 0 on padding."""
    return pad_rows([s.completion_logprobs.detach().cpu() for s in scores], length)


@torch.no_grad()
def teacher_forced_logprobs(model, rollouts, max_tokens_per_batch: int = MigOptions.max_tokens_per_batch,
                            temperature: float = 1.0) -> torch.Tensor:
    """``log pi_old`` of every completion token by a teacher-forced fp32 pass ([N, T], 0 on padding), under the
    sampling ``temperature``."""
    rows = rollout_rows(model, rollouts)
    scores = score_rows(model, rows, EMPTY, max_tokens_per_batch, temperature=temperature)
    return pad_logprobs(scores, rollouts.completion_ids.shape[1])

"""The model passes every stage shares: prompt pieces, the packed forward, teacher-forced log-probs.

All ``l_k`` of a rollout come from ONE forward pass over the packed row

    [x][z (the whole completion)][probe+v copy (k=0, v_0)] ... [probe+v copy (k=K, v_last)]

under a float additive block mask: the completion attends causally as usual, and copy ``(k, v)`` sees the
row up to the end of ``S_k`` (the cut ``c_k``) and itself, never another copy. Each copy gets the position ids
the probe would have had if appended right after ``S_k`` (the model adapter's ``text_positions``), so the pass
equals K+1 separate passes to float tolerance. The same pass yields the log-probs of every completion token:
with gradient for the update (``vlm_mig.rl.stages.update`` scores and trains in this one pass when it can), or
as ``log pi_old`` under ``no_grad``. With gradient the pass runs in two calls of the decoder: ``[x][z]`` of the
whole micro-batch with a key/value cache (the graph the backward needs, the pass GRPO makes), then the copies on
that cache under ``no_grad``, so they cost a forward over their own tokens and no backward (without a cache in
training, i.e. with gradient checkpointing, the copies ride in the one call).

Image features are computed once per prompt (``prompt_pieces``) and shared by all rollouts of its group. Only
scored positions get fp32 log-softmax, chunked, never full-vocabulary logits for the whole row; the answer tokens
are scored without gradient (``l_k`` is a reward, never a loss term).

The completion log-probs are taken at the rollout temperature, the ``l_k`` at 1; on request (the update's pass)
the same fp32 chunks also give the policy's entropy at each completion position, at the rollout temperature and
detached. The MIG math on the ``l_k`` lives in ``vlm_mig.mig``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from vlm_mig.adapter import ADAPTERS, TEXT, adapter_for, cache_keyword, is_multimodal
from vlm_mig.mig import ANSWER_SCORES, MigOptions, answer_scores

#: No tokens: the probe of a pass that scores completions only (no answer copies).
EMPTY = torch.zeros(0, dtype=torch.long)
#: Scored positions per fp32 log-softmax: bounds the [chunk, vocabulary] logits held at once.
LOGPROB_CHUNK = 2048


@dataclass
class PromptPieces:
    """One prompt as the packed passes take it: its ids without padding, the position ids the full sequence
    gives them, and the image features of its image tokens. The rollouts of a group share one."""

    ids: torch.Tensor  #: [P]
    positions: torch.Tensor  #: [3, P] M-RoPE ids (VLMs) or [P] (text models)
    image_embeds: torch.Tensor | None = None  #: [n image tokens, H]; None: no images

    def to(self, device: torch.device | str) -> PromptPieces:
        return PromptPieces(self.ids.to(device), self.positions.to(device),
                            None if self.image_embeds is None else self.image_embeds.to(device))


def prompt_pieces(model, batch) -> list[PromptPieces]:
    """Per-sample ``PromptPieces`` from a left-padded ``PromptBatch``: the vision tower runs once here for the
    whole batch. Runs under the caller's grad mode (the update passes gradients into a trained vision tower)."""
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
        out.append(PromptPieces(ids[i, keep], pos[:, i, keep] if pos.dim() == 3 else pos[i, keep],
                                torch.cat(feats[img : img + n_img]) if n_img else None))
        img += n_img
    return out


@dataclass
class ScoreRow:
    """One rollout, as token ids (nothing here is re-tokenized)."""

    prompt: PromptPieces  #: the prompt the completion continues
    completion_ids: torch.Tensor  #: [T] completion ids through EOS, without padding
    cuts: list[int]  #: completion-relative prefix ends c_0..c_K (c_0 = start of the think content)
    variants: list[torch.Tensor]  #: token ids of each answer surface form in V(y*)
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
    #: [T] entropy of the policy at each completion position, at the completion log-probs' temperature,
    #: detached (None: not asked for, ``packed_forward(entropy=False)``)
    completion_entropy: torch.Tensor | None = None


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
    n_base: int  #: tokens of ``[x][z]``, before the first copy


def layout_row(row: ScoreRow, probe_ids: torch.Tensor, adapter=None) -> PackedLayout:
    """Lay out ``[x][z][copies]`` with explicit positions and per-token visibility (pure, no model).

    ``adapter`` (the model's, ``adapter_for``) continues the positions after the prompt and after each cut; None
    takes the one the prompt's positions imply (M-RoPE for [3, P], 1-D otherwise). Index bookkeeping runs on
    the CPU whatever device the inputs live on; the forward moves the result."""
    prompt_ids, completion_ids = row.prompt.ids.cpu(), row.completion_ids.cpu()
    probe_ids = probe_ids.cpu()
    P, T = prompt_ids.numel(), completion_ids.numel()
    mrope = row.prompt.positions.dim() == 2
    if adapter is None:
        adapter = ADAPTERS["qwen2_vl"] if mrope else TEXT
    pp = row.prompt.positions.cpu() if mrope else row.prompt.positions.cpu().unsqueeze(0)

    def after(upto: int, n: int) -> torch.Tensor:
        """[D, n] positions of n text tokens appended after the row's first ``upto`` tokens."""
        before = base_pos[:, :upto] if upto > P else pp[:, :upto]
        nxt = adapter.text_positions(before if mrope else before[0], n)
        return nxt if mrope else nxt.unsqueeze(0)

    base_pos = torch.cat([pp, after(P, T)], dim=1)

    ids, pos, vis, cid = [prompt_ids, completion_ids], [base_pos], [torch.arange(P + T)], [
        torch.full((P + T,), -1, dtype=torch.long)]
    ans_src, ans_tgt, ans_copy, ans_unit = [], [], [], []
    offset = P + T
    copy = 0
    for k, c in enumerate(row.cuts):
        if not 0 <= c <= T:
            raise ValueError(f"cut {c} outside the completion (length {T})")
        last = P + c - 1  # last token the copy may see
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
            pos.append(after(last + 1, n))
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
        n_base=P + T,
        n_variants=len(row.variants),
    )


def block_mask(visible: torch.Tensor, copy_id: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float additive 4D mask [B, 1, L, L] (0 = attend, dtype min = blocked) for padded packed rows, from each
    token's ``visible`` (last base index it may attend to) and ``copy_id`` (-1 base, -2 padding, else its copy).

    A base token attends causally to the base; a copy token attends to the base up to its cut and causally
    within its own copy. Padding attends to itself only, so no softmax row is empty (no NaN).
    """
    B, length = visible.shape
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
                   temperature: float = 1.0, rival: bool = False,
                   entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """fp32 ``log p(target)`` for each row of ``hidden`` [N, H], in chunks (never all logits at once), under
    ``softmax(logits / temperature)``. With ``rival`` and/or ``entropy`` a tuple: the log-probs, then (``rival``)
    ``max_{u != target} log p(u)``, the most likely other token, then (``entropy``) the entropy
    ``-sum_u p(u) log p(u)`` of each row's distribution at the same temperature, detached (it is logged and
    selects tokens, never a loss term with a gradient)."""
    head = adapter_for(model).output_head(model)
    out, rivals, ents = [], [], []

    def pick(logits: torch.Tensor, s: int) -> None:
        logp = (logits if temperature == 1.0 else logits / temperature).log_softmax(-1)
        tgt = targets[s : s + chunk].unsqueeze(-1)
        out.append(logp.gather(-1, tgt).squeeze(-1))
        if rival:
            top = logp.topk(min(2, logp.shape[-1]), dim=-1)
            other = top.values[:, -1] if top.values.shape[-1] > 1 else torch.full_like(top.values[:, 0], -math.inf)
            rivals.append(torch.where(top.indices[:, 0] == tgt.squeeze(-1), other, top.values[:, 0]))
        if entropy:
            with torch.no_grad():  # one [chunk, V] temporary, freed with the chunk; p log p = 0 where p = 0
                lp = logp.detach()
                ents.append(-lp.exp().mul_(lp).nansum(-1))

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
    if not (rival or entropy):
        return lp
    extra = ([torch.cat(rivals) if rivals else empty] if rival else []) + (
        [torch.cat(ents) if ents else empty] if entropy else [])
    return (lp, *extra)


def packed_forward(model, rows: list[ScoreRow], probe_ids: torch.Tensor, logprob_chunk: int = LOGPROB_CHUNK,
                   answer_score: str = MigOptions.answer_score, temperature: float = 1.0,
                   entropy: bool = False) -> list[RowScores]:
    """Score a micro-batch of rollouts in one forward pass (with gradient and copies: two decoder calls, the
    copies on the completions' cache without a graph). Runs under the caller's grad mode.

    ``l`` uses ``answer_score``; ``l_by_score`` holds every answer score (they share the pass). The completion
    log-probs are those of the sampler, ``softmax(logits / temperature)`` (the rollout temperature), which the
    policy-gradient ratio needs; the step scores ``l_k`` are the model's own likelihoods (temperature 1), so a
    run's process reward does not change with its sampling temperature. ``entropy``: also the policy's entropy at
    each completion position, at the same temperature, detached (``RowScores.completion_entropy``)."""
    if answer_score not in ANSWER_SCORES:
        raise ValueError(f"answer score must be one of {ANSWER_SCORES}, got {answer_score!r}")
    device = next(model.parameters()).device
    adapter = adapter_for(model)
    decoder = adapter.decoder(model)
    layouts = [layout_row(r, probe_ids, adapter) for r in rows]
    bases = [lay.n_base for lay in layouts]
    # With gradient, the copies run after the whole micro-batch's [x][z], on its cached keys and values and without
    # a graph: the backward covers the pass GRPO makes, and the copies cost a forward over their own tokens.
    split = torch.is_grad_enabled() and any(lay.n_copies for lay in layouts) and _caches_in_training(decoder)
    W = max(bases)
    starts = [W if split else b for b in bases]  # where each row's copies begin
    L = max(s + lay.ids.numel() - b for s, b, lay in zip(starts, bases, layouts))
    B = len(rows)
    mrope = rows[0].prompt.positions.dim() == 2
    ids = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros((3, B, L) if mrope else (1, B, L), dtype=torch.long)
    visible = torch.full((B, L), -1, dtype=torch.long)
    copy_id = torch.full((B, L), -2, dtype=torch.long)  # -2 marks padding
    for i, (lay, b, s) in enumerate(zip(layouts, bases, starts)):
        n = lay.ids.numel()
        for dst, src in ((ids[i], lay.ids), (visible[i], lay.visible), (copy_id[i], lay.copy_id)):
            dst[:b], dst[s : s + n - b] = src[:b], src[b:]
        lp = lay.positions if mrope else lay.positions.unsqueeze(0)
        pos[:, i, :b], pos[:, i, s : s + n - b] = lp[:, :b], lp[:, b:]
        lay.answer_src = torch.where(lay.answer_src >= b, lay.answer_src + (s - b), lay.answer_src)
    pos = pos if mrope else pos[0]
    ids, pos = ids.to(device), pos.to(device)
    embeds = adapter.input_embeddings(model)(ids)
    if any(r.prompt.image_embeds is not None for r in rows):
        embeds = _scatter_images(adapter.image_token_id(model), embeds, ids, rows)
    mask = block_mask(visible, copy_id, embeds.dtype).to(device)
    if split:
        from transformers import DynamicCache

        cache = DynamicCache(config=decoder.config)
        kw = {cache_keyword(decoder): cache, "use_cache": True}
        hidden = decoder(inputs_embeds=embeds[:, :W], attention_mask=mask[:, :, :W, :W], position_ids=pos[..., :W],
                         **kw).last_hidden_state
        with torch.no_grad():  # the copies' K and V join the cache, the completions' stay as the backward saved them
            copies = decoder(inputs_embeds=embeds[:, W:], attention_mask=mask[:, :, W:, :], position_ids=pos[..., W:],
                             **kw).last_hidden_state
        hidden = torch.cat([hidden, copies], dim=1)
    else:
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state

    def gather(src_of, tgt_of) -> tuple[torch.Tensor, torch.Tensor]:
        rows_, pos_ = zip(*[(torch.full_like(src_of(lay), i), src_of(lay)) for i, lay in enumerate(layouts)])
        flat = hidden[torch.cat(rows_).to(device), torch.cat(pos_).to(device)]
        return flat, torch.cat([tgt_of(lay) for lay in layouts]).to(device)

    # Every scored position of the micro-batch through one chunked fp32 log-softmax per kind: the completion
    # tokens at the sampling temperature (under the caller's grad mode), the answer tokens at 1 with their most
    # likely rival (``margin``), never with gradient: l_k is a reward, and its logits need no graph.
    comp = token_logprobs(model, *gather(lambda lay: lay.completion_src, lambda lay: lay.completion_tgt),
                          logprob_chunk, temperature=temperature, entropy=entropy)
    comp_lp, comp_ent = comp if entropy else (comp, None)
    with torch.no_grad():
        ans_hidden, ans_tgt = gather(lambda lay: lay.answer_src, lambda lay: lay.answer_tgt)
        ans_lp, ans_rival = token_logprobs(model, ans_hidden.detach(), ans_tgt, logprob_chunk, rival=True)

    results, c_cur, a_cur = [], 0, 0
    for row, lay in zip(rows, layouts):
        comp = comp_lp[c_cur : c_cur + lay.completion_src.numel()]
        ent = None if comp_ent is None else comp_ent[c_cur : c_cur + comp.numel()]
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
                                 l_by_score=best, completion_entropy=ent))
    return results


def _caches_in_training(decoder) -> bool:
    """Whether a training forward of ``decoder`` fills a key/value cache (gradient checkpointing drops it)."""
    return not any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules()) or not decoder.training


def _scatter_images(image_token: int, embeds: torch.Tensor, ids: torch.Tensor, rows: list[ScoreRow]) -> torch.Tensor:
    """Place each row's precomputed image features at its prompt's image-token positions."""
    feats = []
    for i, r in enumerate(rows):
        n = int((ids[i, : r.prompt.ids.numel()] == image_token).sum())
        got = 0 if r.prompt.image_embeds is None else r.prompt.image_embeds.shape[0]
        if got != n:
            raise ValueError(f"row {i}: {n} image tokens in the prompt but {got} image feature rows")
        if n:
            feats.append(r.prompt.image_embeds.to(embeds.dtype))
    where = ids == image_token
    # Completions and copies never hold image tokens the scorer must fill: restrict to prompt spans.
    for i, r in enumerate(rows):
        where[i, r.prompt.ids.numel():] = False
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
        r.prompt.ids.numel() + r.completion_ids.numel()
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


def rollout_rows(model, rollouts, cuts: list[list[int]] | None = None,
                 answers: list[dict] | None = None) -> list[ScoreRow]:
    """``ScoreRow`` for every completion of a ``Rollouts`` batch; prompt pieces (and image features) are
    computed once per prompt and shared by the G rows of its group. ``answers[i]``: row i's answer fields
    (``encode_answers``); None scores no answer (completion log-probs only)."""
    prompts = prompt_pieces(model, rollouts.prompts)
    lengths = rollouts.completion_mask.sum(-1).tolist()
    rows = []
    for i, n in enumerate(lengths):
        g = int(rollouts.group[i])
        rows.append(ScoreRow(
            prompt=prompts[g],
            completion_ids=rollouts.completion_ids[i, :n],
            cuts=cuts[i] if cuts is not None else [],
            **(answers[i] if answers is not None else {"variants": []}),
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
    from vlm_mig.processing import encode_prompts

    row_sample = list(range(len(rows))) if row_sample is None else list(row_sample)
    result: list[float | None] = [None] * len(rows)
    if not is_multimodal(processor):
        return result
    todo = sorted({row_sample[i] for i, r in enumerate(rows)
                   if r.cuts and samples[row_sample[i]].images and samples[row_sample[i]].question is not None})
    if not todo:
        return result
    blind = [Sample(id=s.id, answer=s.answer, task=s.task, answer_variants=s.answer_variants, question=s.question,
                    images=[]) for s in (samples[j] for j in todo)]
    pieces = dict(zip(todo, prompt_pieces(model, encode_prompts(processor, blind, template, None, min_pixels,
                                                              max_pixels))))
    which = [i for i, r in enumerate(rows) if row_sample[i] in pieces and r.cuts]
    blind_rows = [replace(first_copy_rows([rows[i]])[0], prompt=pieces[row_sample[i]]) for i in which]
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


def pad_scores(scores: list[torch.Tensor], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``l_0..l_K`` as one [N, width] tensor on the CPU (0 past a row's K; by default as wide as the
    longest, at least one column), and the mask of its real entries (what ``step_gains`` takes)."""
    ls = [s.detach().cpu() for s in scores]
    width = width or max(1, max(x.numel() for x in ls))
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

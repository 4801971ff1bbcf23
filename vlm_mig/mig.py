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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Pure math on tensors


def watermark(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Monotonic historical watermark ``h_0 = l_0, h_k = max(h_{k-1}, l_k)`` along the last dim.

    ``scores``: [..., K+1]; ``valid``: same shape, False past each row's K (those entries repeat h_K).
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    h = torch.cummax(scores, dim=-1).values
    if valid is not None:
        # -inf entries past K are filled by cummax with h_K already; only an all-invalid row stays -inf.
        h = torch.where(torch.isinf(h), torch.zeros_like(h), h)
    return h


def step_gains(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """MIG per step: ``g_k = max(0, l_k - h_{k-1})`` for k = 1..K, shape [..., K] (0 past each row's K)."""
    h = watermark(scores, valid)
    g = (scores[..., 1:] - h[..., :-1]).clamp_min(0.0)
    if valid is not None:
        g = g.masked_fill(~valid[..., 1:], 0.0)
    return g


def process_reward(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``R_proc = sum_k g_k`` (= ``h_K - h_0``); rows with K = 0 give 0."""
    return step_gains(scores, valid).sum(-1)


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


@dataclass
class RowScores:
    """What the packed pass yields for one rollout."""

    l: torch.Tensor  #: [K+1] step scores (max over variants)
    l_variants: torch.Tensor  #: [K+1, |V|] per-variant scores
    completion_logprobs: torch.Tensor  #: [T] log pi_old of each completion token
    extra: dict = field(default_factory=dict)


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
    ans_src, ans_tgt, ans_copy = [], [], []
    offset = P + T
    copy = 0
    n_probe = probe_ids.numel()
    for c in row.cuts:
        if not 0 <= c <= T:
            raise ValueError(f"cut {c} outside the completion (length {T})")
        last = P + c - 1  # last token the copy may see
        nxt = int(base_pos[:, last].max()) + 1 if last >= 0 else 0
        for v in row.variants:
            v = v.cpu()
            if v.numel() == 0:
                raise ValueError("an answer variant has no tokens")
            seq = torch.cat([probe_ids, v])
            n = seq.numel()
            ids.append(seq)
            pos.append(torch.arange(nxt, nxt + n).unsqueeze(0).expand(pp.shape[0], n))
            vis.append(torch.full((n,), last, dtype=torch.long))
            cid.append(torch.full((n,), copy, dtype=torch.long))
            # Answer token j is predicted by the copy token before it. For j = 0 that is the last probe
            # token; with no probe it is the last token of prefix k, whose base state sees exactly prefix k.
            first = offset + n_probe - 1 if n_probe else last
            if first < 0:
                raise ValueError("an empty probe after an empty prefix: nothing predicts the first answer token")
            ans_src.append(torch.cat([torch.tensor([first]), offset + n_probe + torch.arange(v.numel() - 1)]))
            ans_tgt.append(v)
            ans_copy.append(torch.full((v.numel(),), copy, dtype=torch.long))
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


def image_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Vision-tower features, one [tokens, H] tensor per image (run once per prompt, shared by its group)."""
    out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    return list(out.pooler_output)


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """fp32 ``log p(target)`` for each row of ``hidden`` [N, H], in chunks (never all logits at once)."""
    head = model.get_output_embeddings()
    out = []
    if hasattr(head.weight, "ds_id"):
        # ZeRO-3 partitions the weight: only the module call gathers it (and routes its gradient back to the
        # shards), so the logits come out in the engine's dtype and are upcast before the softmax.
        for s in range(0, hidden.shape[0], chunk):
            logits = head(hidden[s : s + chunk]).float()
            out.append(logits.log_softmax(-1).gather(-1, targets[s : s + chunk].unsqueeze(-1)).squeeze(-1))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
    # fp32 even under bf16 autocast: bf16 logits carry ~0.1 nats of noise, as large as a step's gain.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        weight = head.weight.float()
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s : s + chunk].float(), weight, bias)
            out.append(logits.log_softmax(-1).gather(-1, targets[s : s + chunk].unsqueeze(-1)).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def packed_forward(model, rows: list[ScoreRow], probe_ids: torch.Tensor, logprob_chunk: int = 2048) -> list[RowScores]:
    """Score a micro-batch of rollouts in one forward pass. Runs under the caller's grad mode."""
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
    embed = model.get_input_embeddings()
    embeds = embed(ids)
    if any(r.image_embeds is not None for r in rows):
        embeds = _scatter_images(model, embeds, ids, rows)
    mask = block_mask(layouts, L, embeds.dtype).to(device)
    hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    hidden = hidden.last_hidden_state

    # Gather every scored position of the micro-batch, then one chunked fp32 log-softmax.
    src_rows, src_pos, tgts = [], [], []
    for i, lay in enumerate(layouts):
        for src, tgt in ((lay.completion_src, lay.completion_tgt), (lay.answer_src, lay.answer_tgt)):
            src_rows.append(torch.full_like(src, i))
            src_pos.append(src)
            tgts.append(tgt)
    flat_rows = torch.cat(src_rows).to(device)
    flat_pos = torch.cat(src_pos).to(device)
    lp = token_logprobs(model, hidden[flat_rows, flat_pos], torch.cat(tgts).to(device), logprob_chunk)

    results, cursor = [], 0
    for lay in layouts:
        comp = lp[cursor : cursor + lay.completion_src.numel()]
        cursor += comp.numel()
        ans = lp[cursor : cursor + lay.answer_tgt.numel()]
        cursor += ans.numel()
        copy_idx = lay.answer_copy.to(device)
        sums = torch.zeros(lay.n_copies, device=device, dtype=torch.float32).index_add(0, copy_idx, ans)
        counts = torch.bincount(copy_idx, minlength=lay.n_copies).clamp_min(1).float()
        per_variant = (sums / counts).view(len(rows[len(results)].cuts), lay.n_variants)
        best = per_variant.max(-1).values if lay.n_variants else per_variant.new_zeros(per_variant.shape[0])
        results.append(RowScores(l=best, l_variants=per_variant, completion_logprobs=comp))
    return results


def _scatter_images(model, embeds: torch.Tensor, ids: torch.Tensor, rows: list[ScoreRow]) -> torch.Tensor:
    """Place each row's precomputed image features at its prompt's image-token positions."""
    image_token = model.config.image_token_id
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


def score_rows(model, rows: list[ScoreRow], probe_ids: torch.Tensor, max_tokens_per_batch: int = 16384,
               logprob_chunk: int = 2048) -> list[RowScores]:
    """Score any number of rollouts, micro-batched so no pass exceeds ``max_tokens_per_batch`` (padded
    rows x length, i.e. the attention mask is bounded by its square per row)."""
    lengths = [
        r.prompt_ids.numel() + r.completion_ids.numel()
        + len(r.cuts) * sum(probe_ids.numel() + v.numel() for v in r.variants)
        for r in rows
    ]
    out: list[RowScores | None] = [None] * len(rows)
    batch: list[int] = []
    longest = 0
    for i in sorted(range(len(rows)), key=lambda j: lengths[j]):
        if batch and max(longest, lengths[i]) * (len(batch) + 1) > max_tokens_per_batch:
            for j, s in zip(batch, packed_forward(model, [rows[j] for j in batch], probe_ids, logprob_chunk)):
                out[j] = s
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        for j, s in zip(batch, packed_forward(model, [rows[j] for j in batch], probe_ids, logprob_chunk)):
            out[j] = s
    return out  # type: ignore[return-value]


def prompt_rows(model, batch) -> list[dict]:
    """Per-sample prompt pieces from a left-padded ``PromptBatch``: ids, exact position ids and image
    features (the vision tower runs once here for the whole batch). Rollouts of a group share them."""
    from vlm_mig.processing import rope_position_ids

    device = next(model.parameters()).device
    pos = rope_position_ids(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                            None if batch.mm_token_type_ids is None else batch.mm_token_type_ids.to(device),
                            None if batch.image_grid_thw is None else batch.image_grid_thw.to(device)).cpu()
    feats: list[torch.Tensor] = []
    if batch.pixel_values is not None:
        feats = image_features(model, batch.pixel_values.to(device), batch.image_grid_thw.to(device))
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
                 variants: list[list[torch.Tensor]] | None = None) -> list[ScoreRow]:
    """``ScoreRow`` for every completion of a ``Rollouts`` batch; prompt pieces (and image features) are
    computed once per prompt and shared by the G rows of its group."""
    prompts = prompt_rows(model, rollouts.prompts)
    lengths = rollouts.completion_mask.sum(-1).tolist()
    rows = []
    for i, n in enumerate(lengths):
        g = int(rollouts.group[i])
        rows.append(ScoreRow(
            completion_ids=rollouts.completion_ids[i, :n],
            cuts=cuts[i] if cuts is not None else [],
            variants=variants[i] if variants is not None else [],
            **prompts[g],
        ))
    return rows


def pad_rows(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Stack 1-D tensors into [B, length] (zeros after each), keeping the autograd graph."""
    out = rows[0].new_zeros(len(rows), length) if rows else torch.zeros(0, length)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def pad_logprobs(scores: list[RowScores], length: int) -> torch.Tensor:
    """Stack per-row completion log-probs into [N, length] on the CPU, detached, 0 on padding."""
    return pad_rows([s.completion_logprobs.detach().cpu() for s in scores], length)


@torch.no_grad()
def teacher_forced_logprobs(model, rollouts, max_tokens_per_batch: int = 16384) -> torch.Tensor:
    """``log pi_old`` of every completion token by a teacher-forced fp32 pass ([N, T], 0 on padding)."""
    rows = rollout_rows(model, rollouts)
    empty = torch.zeros(0, dtype=torch.long)
    scores = score_rows(model, rows, empty, max_tokens_per_batch)
    return pad_logprobs(scores, rollouts.completion_ids.shape[1])

"""The stages of one RL step (SPEC section 6), each filling its part of an ``RLBatch``:

    rollout -> segment -> reward -> score -> advantages -> update

Every formula lives in the pure modules (``steps``, ``rewards``, ``mig``, ``advantages``, ``losses``); a stage
wires one of them to the batch, and makes the cross-process reductions its math needs (``collective``): the
batch std of ``advantage.scale: batch`` in ``advantages``, the loss denominators of the global batch in
``update``. Groups never cross processes, so everything else is local.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from vlm_mig.advantages import (
    AdvantageConfig,
    compute_advantages,
    group_normalize,
    process_token_mask,
    scale_sums,
    scale_to_match,
    step_normalize,
    token_advantages,
)
from vlm_mig.config import Config, MigConfig
from vlm_mig.data.schema import Sample
from vlm_mig.losses import Denominators, LossConfig, sft_gate, total_loss
from vlm_mig.mig import (
    EMPTY,
    blind_l0,
    credited_watermark,
    encode_answers,
    pad_logprobs,
    pad_scores,
    rollout_rows,
    score_rows,
    step_gains,
)
from vlm_mig.processing import PromptTemplate, is_processor, tokenizer_of
from vlm_mig.rewards import RewardSpec, compute_rewards
from vlm_mig.rl.batch import RLBatch
from vlm_mig.rl.collective import Collective, gather_columns_padded, gather_rows, own_rows, sum_over_processes
from vlm_mig.rollout import RolloutEngine, Rollouts
from vlm_mig.steps import StepConfig, cot_mask, segment_batch, step_index


def rollout(engine: RolloutEngine, samples: list[Sample], seeds: list[int]) -> RLBatch:
    """G completions per prompt, each from its own seeded stream."""
    return RLBatch(rollouts=engine.generate(samples, seeds=seeds))


def segment(batch: RLBatch, tokenizer: Any, config: StepConfig) -> None:
    """Fills ``spans``, ``m_full`` and ``m_cot`` from the completion ids."""
    r = batch.rollouts
    batch.spans = segment_batch(r.completion_ids, tokenizer, lengths=r.completion_lengths.tolist(), config=config)
    batch.m_full = r.completion_mask.bool()
    batch.m_cot = cot_mask(batch.spans, batch.width) & batch.m_full


def reward(batch: RLBatch, specs: list[RewardSpec]) -> None:
    """Fills ``rewards``, ``r_out``, ``acc`` and ``fmt`` (SPEC section 3)."""
    r, samples = batch.rollouts, batch.samples
    rew = compute_rewards([r.prompts.texts[int(g)] for g in r.group], r.texts, specs,
                          answer=[s.variants for s in samples], task=[s.task for s in samples])
    batch.rewards = rew
    batch.r_out = torch.tensor(rew.total, dtype=torch.float32)
    batch.acc = torch.tensor([v or 0.0 for v in rew.components["accuracy"]])
    batch.fmt = torch.tensor([v or 0.0 for v in rew.components["format"]])


@dataclass
class Scorer:
    """What the score stage runs: the policy (as pi_old) and the reference model, built once per run."""

    model: nn.Module
    processor: Any
    template: PromptTemplate
    mig: MigConfig
    probe_ids: torch.Tensor
    step_scores: bool  #: l_k are needed (``needs_step_scores``)
    old_logprobs: bool  #: log pi_old is needed: the update makes several passes over the batch
    ref_model: nn.Module | None = None  #: pi_ref, when the loss has a KL term
    min_pixels: int | None = None  #: image sizing of the rollouts (for the prompts without images)
    max_pixels: int | None = None
    temperature: float = 1.0  #: the rollouts' sampling temperature: old and reference log-probs are taken at it


def needs_step_scores(cfg: Config) -> bool:
    """Whether a run uses l_k: the process term, the R_proc SFT gate, step credit, or the visual evidence log.
    Without them (the GRPO baseline) the packed scoring pass runs only for old log-probs, if at all."""
    return (cfg.loss.alpha != 0 or cfg.loss.sft_gate_proc or cfg.advantage.process_credit == "step"
            or cfg.mig.visual_evidence)


@torch.no_grad()
def score(batch: RLBatch, scorer: Scorer) -> None:
    """Fills ``l``, ``gains``, ``r_proc``, ``l0_blind``, ``old_logp`` and ``ref_logp`` from one packed pass of the
    policy (every l_k and the old log-probs together) and one plain pass of the reference model (SPEC section 2)."""
    r, m, T = batch.rollouts, scorer.mig, batch.width
    batch.r_proc = torch.zeros(batch.n)
    batch.gains = torch.zeros(batch.n, 0)
    batch.l0_blind = [None] * batch.n
    if scorer.step_scores or scorer.old_logprobs:
        cuts = [sp.prefix_ends if (scorer.step_scores and sp.think) else [] for sp in batch.spans]
        answers = None  # no answer copies: the completion log-probs alone
        if scorer.step_scores:  # the G rollouts of a prompt share its answer forms
            tok = tokenizer_of(scorer.processor)
            per_group = [encode_answers(tok, s.variants, m.probe, m.opener) for s in r.samples]
            answers = [per_group[int(g)] for g in r.group]
        rows = rollout_rows(scorer.model, r, cuts, answers)
        scores = score_rows(scorer.model, rows, scorer.probe_ids, m.max_tokens_per_batch, answer_score=m.answer_score,
                            temperature=scorer.temperature)
        if m.visual_evidence and is_processor(scorer.processor):
            batch.l0_blind = blind_l0(scorer.model, scorer.processor, r.samples, rows, scorer.probe_ids,
                                      scorer.template, row_sample=[int(g) for g in r.group],
                                      max_tokens_per_batch=m.max_tokens_per_batch, answer_score=m.answer_score,
                                      min_pixels=scorer.min_pixels, max_pixels=scorer.max_pixels)
        if scorer.step_scores:
            batch.l, valid = pad_scores(scores)
            batch.gains = step_gains(batch.l, valid, use_watermark=m.watermark, min_gain=m.min_gain, records=m.records)
            batch.watermark = credited_watermark(batch.l, valid, m.min_gain, m.records) if m.watermark else batch.l
            batch.r_proc = batch.gains.sum(-1)
        if scorer.old_logprobs:
            batch.old_logp = pad_logprobs(scores, T)
    if scorer.ref_model is not None:
        ref = score_rows(scorer.ref_model, rollout_rows(scorer.ref_model, r), EMPTY, m.max_tokens_per_batch,
                         temperature=scorer.temperature)
        batch.ref_logp = pad_logprobs(ref, T)


def advantages(batch: RLBatch, cfg: AdvantageConfig, min_spread: float, dist: Collective) -> None:
    """Fills ``adv`` and ``m_proc`` (SPEC section 4). Group statistics are local (groups never cross processes);
    ``scale: batch`` divides by the std of the global batch, gathered from every process; ``process_scale:
    match_outcome`` rescales the process advantage by a factor from sums over the global batch."""
    G = batch.group_size
    batch.m_proc = process_token_mask(batch.m_full, batch.m_cot, cfg.process_mask)
    step: dict[str, torch.Tensor] = {}
    if cfg.process_credit == "step":
        step = {"step_gains": batch.gains, "step_mask": torch.arange(batch.gains.shape[1]) < batch.K.unsqueeze(1),
                "token_step": step_index(batch.spans, batch.width)}
    adv = compute_advantages(batch.r_out, batch.r_proc, batch.m_full, batch.m_cot, G, cfg, min_spread=min_spread,
                             **step)
    batch.adv = adv
    if dist.num_processes > 1 and cfg.scale == "batch":
        _batch_scale(batch, cfg, min_spread, dist, step)
    if cfg.process_scale == "match_outcome":
        sums = sum_over_processes(dist, [*scale_sums(adv.tok_out, batch.m_full),
                                         *scale_sums(adv.tok_proc, batch.m_proc)])
        factor = scale_to_match((sums[0], sums[1]), (sums[2], sums[3]))
        adv.tok_proc = adv.tok_proc * factor
        adv.seq_proc = adv.seq_proc * factor
        adv.process_scale = factor


def _batch_scale(batch: RLBatch, cfg: AdvantageConfig, min_spread: float, dist: Collective,
                 step: dict[str, torch.Tensor]) -> None:
    """``scale: batch`` over several processes: the advantages normalised by the std of the global batch."""
    adv, G = batch.adv, batch.group_size
    # Normalise the gathered values, keep this process's rows.
    mine = own_rows(dist, batch.n)
    adv.seq_out = group_normalize(gather_rows(dist, batch.r_out), G, scale="batch", eps=cfg.eps)[mine]
    adv.tok_out = token_advantages(adv.seq_out, batch.m_full)
    adv.seq_proc = group_normalize(gather_rows(dist, batch.r_proc), G, scale="batch", eps=cfg.eps,
                                   min_spread=min_spread)[mine]
    if cfg.process_credit == "trajectory":
        adv.tok_proc = token_advantages(adv.seq_proc, batch.m_proc)
        return
    # Each process has as many step columns as its longest K.
    width = batch.gains.shape[1]
    all_gains = gather_columns_padded(dist, step["step_gains"])
    all_mask = gather_columns_padded(dist, step["step_mask"].float()).bool()
    step_adv = step_normalize(all_gains, all_mask, G, scale="batch", eps=cfg.eps, min_spread=min_spread)[mine, :width]
    adv.tok_proc = token_advantages(None, batch.m_cot, step_adv=step_adv, token_step=step["token_step"])


class Learner(Protocol):
    """The trainable side of the update: the policy's passes, the backward and the optimizer step."""

    device: torch.device

    def completion_logprobs(self, rollouts: Rollouts, rows: list[int]) -> torch.Tensor:
        """Gradient-carrying log pi_theta of the completions ``rows`` ([len(rows), T], 0 on padding)."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate one micro-batch's gradient; ``last`` ends the update."""

    def optimizer_step(self) -> float:
        """Clip, step, and return the gradient norm."""


@dataclass
class Update:
    """What the update stage did."""

    grad_norm: float
    #: per micro-batch of every pass: (rows, detached loss diagnostics of ``total_loss``)
    diagnostics: list[tuple[int, dict[str, torch.Tensor]]]


def update(batch: RLBatch, learner: Learner, cfg: LossConfig, *, micro_batch_size: int, num_iterations: int,
           dist: Collective) -> Update:
    """``num_iterations`` optimisation passes over the batch in micro-batches (SPEC section 5). Each loss term is
    divided by its denominator over the global batch, so micro-batches and processes add up to one batch."""
    gate = sft_gate(batch.acc, batch.fmt, batch.r_proc, gate_proc=cfg.sft_gate_proc, gates=cfg.sft_gates)
    den = Denominators.from_batch(batch.m_proc, batch.m_full, gate, cfg, total=partial(sum_over_processes, dist))
    dev = learner.device

    def rows(t: torch.Tensor | None, sl: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[sl].to(dev)

    diagnostics: list[tuple[int, dict[str, torch.Tensor]]] = []
    grad_norm = 0.0
    starts = list(range(0, batch.n, micro_batch_size))
    for _ in range(num_iterations):
        for c_i, start in enumerate(starts):
            idx = list(range(start, min(batch.n, start + micro_batch_size)))
            sl = torch.tensor(idx)
            loss, diag = total_loss(
                learner.completion_logprobs(batch.rollouts, idx), rows(batch.old_logp, sl), rows(batch.m_full, sl),
                rows(batch.m_proc, sl), rows(batch.adv.tok_out, sl), rows(batch.adv.tok_proc, sl), cfg,
                ref_logp=rows(batch.ref_logp, sl), acc=rows(batch.acc, sl), fmt=rows(batch.fmt, sl),
                r_proc=rows(batch.r_proc, sl), denominators=den,
            )
            learner.backward(loss, last=c_i == len(starts) - 1)
            diagnostics.append((len(idx), diag))
        grad_norm = learner.optimizer_step()
    return Update(grad_norm=grad_norm, diagnostics=diagnostics)

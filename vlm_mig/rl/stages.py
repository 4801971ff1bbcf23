"""The stages of one RL step (SPEC section 6), each filling its part of an ``RLBatch``:

    rollout -> segment -> reward -> score -> advantages -> update

Every formula lives in the pure modules (``steps``, ``rewards``, ``mig``, ``advantages``, ``losses``); a stage
wires one of them to the batch, and makes the cross-process reductions its math needs (``collective``): the
batch std of ``advantage.scale: batch`` in ``advantages``, the loss denominators of the global batch in
``update``. Groups never cross processes, so everything else is local.

Step scores in the update's own forward: with ``num_iterations: 1`` the policy that is scored is the policy that
is updated, so the update's packed pass carries the probe copies too and yields the l_k (from detached logits)
beside the log-probs it backpropagates through; each micro-batch holds whole groups, so its advantages are
computed from its own l_k right there (``in_update_blocker`` says when that cannot hold, and then the score
stage makes its own pass first, as it always does for ``num_iterations > 1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from vlm_mig.adapter import is_multimodal
from vlm_mig.advantages import (
    AdvantageConfig,
    Advantages,
    normalize,
    process_token_mask,
    scale_sums,
    scale_to_match,
    token_level,
)
from vlm_mig.config import Config, MigConfig
from vlm_mig.data.schema import Sample
from vlm_mig.forward import EMPTY, RowScores, ScoreRow, blind_l0, pad_logprobs, pad_scores, rollout_rows, score_rows
from vlm_mig.losses import Denominators, LossConfig, sft_gate, total_loss
from vlm_mig.mig import MigOptions, credited_watermark, encode_answers, step_gains
from vlm_mig.processing import PromptTemplate, tokenizer_of
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
    """Fills ``rewards``, ``r_out``, ``acc`` and ``fmt`` (SPEC section 3). Every reward function gets the columns
    ``answer``, ``task`` and ``completion_length`` (tokens through EOS, what ``overlong`` reads)."""
    r, samples = batch.rollouts, batch.samples
    rew = compute_rewards([r.prompts.texts[int(g)] for g in r.group], r.texts, specs,
                          answer=[s.variants for s in samples], task=[s.task for s in samples],
                          completion_length=r.completion_lengths.tolist())
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
    mig: MigOptions  #: a run's ``mig`` section (``MigConfig``), or ``vlm-mig score``'s options
    probe_ids: torch.Tensor
    step_scores: bool  #: l_k are needed (``needs_step_scores``)
    old_logprobs: bool  #: log pi_old is needed: the update makes several passes over the batch
    ref_model: nn.Module | None = None  #: pi_ref, when the loss has a KL term
    min_pixels: int | None = None  #: image sizing of the rollouts (for the prompts without images)
    max_pixels: int | None = None
    temperature: float = 1.0  #: the rollouts' sampling temperature: old and reference log-probs are taken at it
    #: the update's forward scores the l_k (``in_update_blocker`` is None): no policy pass here for them
    in_update: bool = False


def needs_step_scores(cfg: Config) -> bool:
    """Whether a run uses l_k: the process term, the R_proc SFT gate, step credit, or the visual evidence log.
    Without them (the GRPO baseline) the packed scoring pass runs only for old log-probs, if at all."""
    return (cfg.loss.alpha != 0 or cfg.loss.sft_gate_proc or cfg.advantage.process_credit == "step"
            or cfg.mig.visual_evidence)


def filter_reads_process(signal: str) -> bool:
    """Whether dynamic sampling's ``advantage.filter_groups`` reads R_proc: then each draw is scored before the
    filter (the score stage's own pass), and the update cannot be where the l_k are scored."""
    return signal in ("total", "outcome_and_process")


def in_update_blocker(cfg: Config) -> str | None:
    """Why the update cannot score the l_k in its own forward pass (None: it can, and does). Each reason is a
    quantity the first micro-batch's loss needs from rows it does not hold."""
    if not needs_step_scores(cfg):
        return "no step scores are needed"
    if cfg.trainer.num_iterations > 1:
        return "trainer.num_iterations > 1: every pass needs the l_k of pi_old, scored before the first update"
    if cfg.advantage.scale == "batch":
        return "advantage.scale: batch divides by the std of every group's rewards"
    if cfg.advantage.process_scale == "match_outcome":
        return "advantage.process_scale: match_outcome rescales by sums over the whole batch"
    if cfg.loss.sft_gate_proc:
        return "loss.sft_gate_proc: the SFT term divides by the gated count of the whole batch"
    if filter_reads_process(cfg.advantage.filter_groups):
        return f"advantage.filter_groups: {cfg.advantage.filter_groups} reads R_proc to choose the batch's groups"
    if cfg.trainer.micro_batch_size < cfg.rollout.num_generations:
        return "trainer.micro_batch_size is smaller than a group (rollout.num_generations)"
    return None


@dataclass
class StepScoring:
    """What a packed pass needs to score l_k: per row, its cuts and its answer forms (``encode_answers``)."""

    cuts: list[list[int]]
    answers: list[dict]
    probe_ids: torch.Tensor
    answer_score: str


def step_scoring(batch: RLBatch, scorer: Scorer) -> StepScoring:
    """The cuts of every row (none where the completion has no think block) and the answer forms, encoded once
    per prompt and shared by its G rollouts."""
    m = scorer.mig
    tok = tokenizer_of(scorer.processor)
    per_group = [encode_answers(tok, s.variants, m.probe, m.opener) for s in batch.rollouts.samples]
    return StepScoring(cuts=batch.cuts, answers=[per_group[int(g)] for g in batch.rollouts.group],
                       probe_ids=scorer.probe_ids, answer_score=m.answer_score)


def put_step_scores(batch: RLBatch, rows: list[int], ls: list[torch.Tensor], m: MigOptions) -> None:
    """Write the l_0..l_K of ``rows`` into the batch, with their watermark, gains and R_proc (the batch's step
    columns are laid out for every row's K on first use)."""
    if batch.l is None:
        width = max(1, max((sp.K + 1 if sp.think else 0) for sp in batch.spans))
        batch.l = torch.zeros(batch.n, width)
        batch.watermark = torch.zeros(batch.n, width)
        batch.gains = torch.zeros(batch.n, width - 1)
    idx = torch.tensor(rows, dtype=torch.long)
    l, valid = pad_scores(ls, batch.l.shape[1])
    batch.l[idx] = l
    batch.gains[idx] = step_gains(l, valid, use_watermark=m.watermark, min_gain=m.min_gain, records=m.records)
    wm = credited_watermark(l, valid, m.min_gain, m.records) if m.watermark else l
    batch.watermark[idx] = torch.where(valid, wm, 0.0)  # 0 past each row's K, as l
    batch.r_proc[idx] = batch.gains[idx].sum(-1)


@dataclass
class Scored:
    """The policy pass of the score stage, row by row, for callers that read more than the batch keeps
    (``vlm-mig score``: the scored sequences, every answer score)."""

    rows: list[ScoreRow]
    scores: list[RowScores]


@torch.no_grad()
def score(batch: RLBatch, scorer: Scorer) -> Scored | None:
    """Fills ``l``, ``gains``, ``r_proc``, ``l0_blind``, ``old_logp`` and ``ref_logp`` from one packed pass of the
    policy (every l_k and the old log-probs together) and one plain pass of the reference model (SPEC section 2).
    With ``scorer.in_update`` the l_k are left to the update's forward. Returns the policy pass (None: none ran)."""
    r, m, T = batch.rollouts, scorer.mig, batch.width
    batch.r_proc = torch.zeros(batch.n)
    batch.gains = torch.zeros(batch.n, 0)
    batch.l0_blind = [None] * batch.n
    here = scorer.step_scores and not scorer.in_update  # the l_k come from this pass
    # (the visual evidence scores copy 0 of each row with its answer forms too)
    scoring = step_scoring(batch, scorer) if here or (scorer.step_scores and m.visual_evidence) else None
    scored = None
    if here or scorer.old_logprobs or m.visual_evidence:
        rows = rollout_rows(scorer.model, r, scoring and scoring.cuts, scoring and scoring.answers)
        if m.visual_evidence and is_multimodal(scorer.processor):
            batch.l0_blind = blind_l0(scorer.model, scorer.processor, r.samples, rows, scorer.probe_ids,
                                      scorer.template, row_sample=[int(g) for g in r.group],
                                      max_tokens_per_batch=m.max_tokens_per_batch, answer_score=m.answer_score,
                                      min_pixels=scorer.min_pixels, max_pixels=scorer.max_pixels)
        if here or scorer.old_logprobs:
            if not here:  # the completions alone
                rows = [replace(row, cuts=[], variants=[]) for row in rows]
            scores = score_rows(scorer.model, rows, scorer.probe_ids, m.max_tokens_per_batch,
                                answer_score=m.answer_score, temperature=scorer.temperature)
            if here:
                put_step_scores(batch, list(range(batch.n)), [s.l for s in scores], m)
            if scorer.old_logprobs:
                batch.old_logp = pad_logprobs(scores, T)
            scored = Scored(rows, scores)
    if scorer.ref_model is not None:
        ref = score_rows(scorer.ref_model, rollout_rows(scorer.ref_model, r), EMPTY, m.max_tokens_per_batch,
                         temperature=scorer.temperature)
        batch.ref_logp = pad_logprobs(ref, T)
    return scored


def advantages(batch: RLBatch, cfg: AdvantageConfig, min_spread: float, dist: Collective) -> None:
    """Fills ``adv`` and ``m_proc`` (SPEC section 4). Group statistics are local (groups never cross processes);
    ``scale: batch`` normalises the rewards of every process together (gathered) and keeps this process's rows;
    ``process_scale: match_outcome`` rescales the process advantage by a factor from sums over the global batch."""
    batch.m_proc = process_token_mask(batch.m_full, batch.m_cot, cfg.process_mask)
    batch.adv = _advantages_of_rows(batch, list(range(batch.n)), cfg, min_spread, dist)
    if cfg.process_scale == "match_outcome":
        adv = batch.adv
        sums = sum_over_processes(dist, [*scale_sums(adv.tok_out, batch.m_full),
                                         *scale_sums(adv.tok_proc, batch.m_proc)])
        factor = scale_to_match((sums[0], sums[1]), (sums[2], sums[3]))
        adv.tok_proc = adv.tok_proc * factor
        adv.seq_proc = adv.seq_proc * factor
        adv.process_scale = factor


def _advantages_of_rows(batch: RLBatch, rows: list[int], cfg: AdvantageConfig, min_spread: float,
                        dist: Collective | None) -> Advantages:
    """The advantages of ``rows`` (whole groups), normalised once: over the rows themselves, or over every
    process's rows for ``scale: batch`` with several processes (``dist``)."""
    G, idx = batch.group_size, torch.tensor(rows, dtype=torch.long)
    r_out, r_proc = batch.r_out[idx], batch.r_proc[idx]
    step: dict[str, torch.Tensor] = {}
    token_step = None
    if cfg.process_credit == "step":
        K = batch.K[idx]
        gains = batch.gains[idx][:, : int(K.max()) if K.numel() else 0]
        step = {"step_gains": gains, "step_mask": torch.arange(gains.shape[1]) < K.unsqueeze(1)}
        token_step = step_index([batch.spans[i] for i in rows], batch.width)
    if dist is not None and dist.num_processes > 1 and cfg.scale == "batch":
        width = step["step_gains"].shape[1] if step else 0
        everyone = {"r_out": gather_rows(dist, r_out), "r_proc": gather_rows(dist, r_proc)}
        if step:
            everyone["step_gains"] = gather_columns_padded(dist, step["step_gains"])
            everyone["step_mask"] = gather_columns_padded(dist, step["step_mask"].float()).bool()
        norm = normalize(everyone.pop("r_out"), everyone.pop("r_proc"), G, cfg, min_spread=min_spread, **everyone)
        norm = norm.rows(own_rows(dist, len(rows)))
        if norm.step_adv is not None:
            norm.step_adv = norm.step_adv[:, :width]
    else:
        norm = normalize(r_out, r_proc, G, cfg, min_spread=min_spread, **step)
    return token_level(norm, r_out, r_proc, batch.m_full[idx], batch.m_cot[idx], G, cfg, token_step=token_step,
                       min_spread=min_spread)


class PolicyPass(NamedTuple):
    """What the update's pass of the policy yields for a micro-batch of rows."""

    logp: torch.Tensor  #: [rows, T] gradient-carrying log pi_theta at the rollout temperature, 0 on padding
    l: list[torch.Tensor] | None = None  #: each row's l_0..l_K from the same pass (detached); None: not scored
    #: [rows, T] the policy's entropy at each completion position, at the rollout temperature, detached, 0 on
    #: padding (None: not computed)
    entropy: torch.Tensor | None = None


class Learner(Protocol):
    """The trainable side of the update: the policy's passes, the backward and the optimizer step."""

    device: torch.device

    def completion_logprobs(self, rollouts: Rollouts, rows: list[int],
                            scoring: StepScoring | None = None) -> PolicyPass:
        """Gradient-carrying log pi_theta of the completions ``rows`` ([len(rows), T], 0 on padding), with
        ``scoring`` each row's l_0..l_K from the same pass (detached), and the per-token entropy (detached)."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate one micro-batch's gradient; ``last`` ends the update."""

    def optimizer_step(self) -> float:
        """Clip, step, and return the gradient norm."""


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Rows ``0..n-1`` in consecutive micro-batches of at most ``size``."""
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def accumulate(learner: Learner, batches: list[list[int]],
               loss_of: Callable[[list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
               ) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """One optimisation pass of gradient accumulation: the loss of each micro-batch backward in turn (the last
    one ends the update), then the optimizer step is the caller's. Returns (rows, diagnostics) per micro-batch."""
    out = []
    for i, rows in enumerate(batches):
        loss, diag = loss_of(rows)
        learner.backward(loss, last=i == len(batches) - 1)
        out.append((len(rows), diag))
    return out


@dataclass
class Update:
    """What the update stage did."""

    grad_norm: float
    #: per micro-batch of every pass: (rows, detached loss diagnostics of ``total_loss``)
    diagnostics: list[tuple[int, dict[str, torch.Tensor]]]


@dataclass
class InUpdate:
    """The update's share of the score and advantages stages when it scores the l_k itself."""

    scoring: StepScoring
    mig: MigConfig
    advantage: AdvantageConfig


def update(batch: RLBatch, learner: Learner, cfg: LossConfig, *, micro_batch_size: int, num_iterations: int,
           dist: Collective, in_update: InUpdate | None = None) -> Update:
    """``num_iterations`` optimisation passes over the batch in micro-batches (SPEC section 5). Each loss term is
    divided by its denominator over the global batch, so micro-batches and processes add up to one batch.

    With ``in_update`` (``in_update_blocker`` is None: one pass, group-local advantages) each micro-batch holds
    ``micro_batch_size // G`` whole groups; its pass yields the l_k too, and its advantages are computed from
    them before its loss; ``batch.adv`` is filled for the whole batch at the end. The pass's per-token entropy goes
    to ``total_loss`` (each pass its own) and, from the first pass (the policy that sampled), to ``batch.entropy``."""
    G = batch.group_size
    if in_update is not None:
        if num_iterations != 1 or micro_batch_size < G:
            raise ValueError("scoring in the update needs one pass and micro-batches of whole groups")
        batch.m_proc = process_token_mask(batch.m_full, batch.m_cot, in_update.advantage.process_mask)
        micro_batch_size -= micro_batch_size % G
    gate = sft_gate(batch.acc, batch.fmt, batch.r_proc, gate_proc=cfg.sft_gate_proc, gates=cfg.sft_gates)
    den = Denominators.from_batch(batch.m_proc, batch.m_full, gate, cfg, total=partial(sum_over_processes, dist),
                                  truncated=batch.rollouts.truncated)
    dev = learner.device
    batch.entropy = None
    first_pass = True

    def loss_of(rows: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if in_update is None:
            out = learner.completion_logprobs(batch.rollouts, rows)
            adv = batch.adv
            which = torch.tensor(rows)
            tok_out, tok_proc = adv.tok_out[which], adv.tok_proc[which]
        else:
            out = learner.completion_logprobs(batch.rollouts, rows, in_update.scoring)
            put_step_scores(batch, rows, out.l, in_update.mig)
            adv = _advantages_of_rows(batch, rows, in_update.advantage, in_update.mig.min_spread, None)
            tok_out, tok_proc = adv.tok_out, adv.tok_proc
        if first_pass and out.entropy is not None:
            if batch.entropy is None:
                batch.entropy = torch.zeros(batch.n, batch.width)
            batch.entropy[torch.tensor(rows, dtype=torch.long)] = out.entropy.detach().float().cpu()
        return total_loss(out.logp, batch.loss_inputs(rows, dev, tok_out, tok_proc, gate), cfg,
                          entropy=out.entropy, denominators=den)

    diagnostics: list[tuple[int, dict[str, torch.Tensor]]] = []
    grad_norm = 0.0
    for it in range(num_iterations):
        first_pass = it == 0
        diagnostics += accumulate(learner, micro_batches(batch.n, micro_batch_size), loss_of)
        grad_norm = learner.optimizer_step()
    if in_update is not None:  # the whole batch's advantages, for the logs (group-local: equal to the pieces)
        advantages(batch, in_update.advantage, in_update.mig.min_spread, dist)
    return Update(grad_norm=grad_norm, diagnostics=diagnostics)

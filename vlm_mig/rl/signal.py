"""Is an RL step's update signal or noise? The gradient signal-to-noise of one step, per group of rollouts.

A step's gradient is the sum of its groups' gradients (a group's rollouts share one prompt and one baseline).
If the groups pushed the weights in unrelated directions the sum would be noise that Adam, which normalises
its step, follows at full size. Measured per group ``j`` (gradient ``g_j``, n groups):

    SNR = |mean_j g_j|^2 / mean_j |g_j|^2

is 1 when every group agrees and about 1/n when the group gradients are independent noise around 0 (the
``noise_floor`` reported beside it). The cosine between the gradients of two independent batches says the
same across steps: near 0, consecutive updates do not add up.

``gradient_signal`` runs the trainer's own stages (rollout -> segment -> reward -> score -> advantages) and
its update with one group per micro-batch, recording each micro-batch's gradient instead of stepping. Single
process; nothing is updated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlm_mig.losses import LossConfig
from vlm_mig.rl import stages


def signal_to_noise(grads: torch.Tensor, equal_outcome: torch.Tensor | None = None) -> dict[str, float]:
    """``grads``: [n, P], one flattened gradient per group. ``snr``, ``noise_floor`` (1/n) and ``groups``
    with a non-zero gradient; with ``equal_outcome`` ([n] bool: the group's outcome rewards are all equal), also
    ``power_share_equal_outcome``, the share of sum_j |g_j|^2 that comes from those groups (where the outcome
    advantage, and so GRPO, gives no gradient)."""
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"signal_to_noise needs [n >= 2, P] gradients, got {tuple(grads.shape)}")
    g = grads.double()
    per_group = g.square().sum(-1)
    power = per_group.mean()
    snr = float(g.mean(0).square().sum() / power) if power > 0 else 0.0
    out = {"snr": snr, "noise_floor": 1.0 / g.shape[0], "groups": g.shape[0],
           "groups_with_gradient": int((g.abs().sum(-1) > 0).sum())}
    if equal_outcome is not None:
        out["equal_outcome_groups"] = int(equal_outcome.sum())
        out["power_share_equal_outcome"] = (float(per_group[equal_outcome].sum() / per_group.sum())
                                            if power > 0 else float("nan"))
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened gradients (0 when either is 0)."""
    na, nb = a.double().norm(), b.double().norm()
    return float(a.double() @ b.double() / (na * nb)) if na > 0 and nb > 0 else 0.0


class _GroupGradients:
    """The update stage's ``Learner`` that keeps each micro-batch's gradient and never steps."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.device = trainer.device
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.grads: list[torch.Tensor] = []

    def completion_logprobs(self, rollouts, rows, scoring=None):
        return self.trainer.completion_logprobs(rollouts, rows, scoring)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.trainer.backward(loss, last=True)
        self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().cpu()
                                     for p in self.params]))
        for p in self.params:
            p.grad = None

    def optimizer_step(self) -> float:
        return 0.0


def group_gradients(trainer: Any, step: int,
                    terms: dict[str, LossConfig]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-group gradients [n groups, P] of each loss in ``terms`` on the batch of training step ``step`` (the
    same rollouts for every term), and which groups have equal outcome rewards ([n] bool). The trainer must
    score step scores when a term has a process part."""
    cfg = trainer.cfg
    if trainer.acc.num_processes != 1:
        raise RuntimeError("gradient_signal runs in a single process")
    samples, seeds = trainer.batch_for(step, cfg.trainer.prompts_per_step)
    batch = stages.rollout(trainer.engine, samples, seeds)
    stages.segment(batch, trainer.tok, trainer.step_cfg)
    stages.reward(batch, trainer.reward_specs)
    # Scored up front (never in the update): every term's update below reads the same advantages.
    stages.score(batch, dataclasses.replace(trainer.scorer, in_update=False))
    stages.advantages(batch, cfg.advantage, cfg.mig.min_spread, trainer.acc)
    out = {}
    for name, loss_cfg in terms.items():
        learner = _GroupGradients(trainer)
        stages.update(batch, learner, loss_cfg, micro_batch_size=batch.group_size, num_iterations=1,
                      dist=trainer.acc)
        out[name] = torch.stack(learner.grads)
    rg = batch.r_out.view(-1, batch.group_size)
    return out, rg.amax(-1) == rg.amin(-1)


def loss_terms(loss: LossConfig) -> dict[str, LossConfig]:
    """The outcome term alone (the GRPO update), the process term alone, and the configured loss."""
    return {"outcome": dataclasses.replace(loss, alpha=0.0, beta=1.0, gamma=0.0, kl_coef=0.0),
            "process": dataclasses.replace(loss, alpha=1.0, beta=0.0, gamma=0.0, kl_coef=0.0),
            "configured": loss}


def gradient_signal(trainer: Any, steps: int = 4, terms: dict[str, LossConfig] | None = None) -> dict[str, dict]:
    """For each loss term, over the groups of the batches of the first ``steps`` training steps (the first
    policy's rollouts, nothing updated): the SNR of the group gradients (``signal_to_noise``; more groups than one
    step holds, so the measurement itself is not noise), and the cosine between the summed gradients of the
    first and the second half of the steps (two independent batches of prompts and rollouts)."""
    if steps < 2:
        raise ValueError(f"gradient_signal needs >= 2 steps, got {steps}")
    terms = terms or loss_terms(trainer.cfg.loss)
    drawn = [group_gradients(trainer, s, terms) for s in range(steps)]
    equal = torch.cat([e for _, e in drawn])
    half = steps // 2
    out = {}
    for name in terms:
        grads = torch.cat([g[name] for g, _ in drawn])
        first = torch.cat([g[name] for g, _ in drawn[:half]]).sum(0)
        second = torch.cat([g[name] for g, _ in drawn[half:]]).sum(0)
        out[name] = {**signal_to_noise(grads, equal), "steps": steps, "cosine_two_batches": cosine(first, second)}
    return out

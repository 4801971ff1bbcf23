"""The metrics of one RL step (SPEC section 6, "Log"), read off a finished ``RLBatch``."""

from __future__ import annotations

import torch

from vlm_mig.advantages import equal_outcome_share, within_group_credit
from vlm_mig.rl.batch import RLBatch
from vlm_mig.rl.stages import Update

#: Diagnostics that are sums over micro-batches (each micro-batch holds its share of a batch-level value).
ADDITIVE = ("loss", "pg_proc", "pg_out", "kl", "sft", "sft_gated")


def step_metrics(batch: RLBatch, upd: Update, times: dict[str, float], lr: float,
                 num_iterations: int) -> dict[str, float]:
    """This process's metrics of the step (the trainer averages them over processes)."""
    adv, K = batch.adv, batch.K
    n_tokens = int(batch.rollouts.attention_mask.sum())
    metrics = {
        "reward/total": float(batch.r_out.mean()),
        "reward/accuracy": float(batch.acc.mean()),
        "reward/format": float(batch.fmt.mean()),
        **overlong_metrics(batch),
        "mig/process_reward": float(batch.r_proc.mean()),
        "mig/K": float(K.float().mean()),
        "mig/l0": float(batch.l[:, 0].mean()) if batch.l is not None else float("nan"),
        **signal_metrics(batch),
        **entropy_metrics(batch),
        "adv/zero_std_out": adv.zero_std_out,
        "adv/zero_std_proc": adv.zero_std_proc,
        "adv/below_min_spread": adv.below_min_spread,
        "adv/proc_abs_mean": float(adv.seq_proc.abs().mean()),
        "adv/process_scale": adv.process_scale,
        # The part of the process advantage in groups where every outcome is equal (GRPO has no gradient there).
        "adv/proc_share_equal_outcome": equal_outcome_share(batch.r_out, adv.tok_proc, batch.group_size),
        "length/completion": float(batch.rollouts.completion_lengths.float().mean()),
        "length/cot": float(batch.m_cot.sum(-1).float().mean()),
        "optim/grad_norm": upd.grad_norm,
        "optim/lr": lr,
        **{f"time/{k}": v for k, v in times.items()},
        "time/tokens_per_s": n_tokens / max(1e-9, sum(times.values())),
    }
    metrics.update(average_diagnostics(upd.diagnostics, num_iterations))
    if batch.l is not None:
        credit = within_group_credit(batch.acc, batch.r_proc, adv.seq_out, adv.seq_proc, batch.group_size)
        metrics.update({f"credit/{k}": v for k, v in credit.items()})
    return metrics


def signal_metrics(batch: RLBatch) -> dict[str, float]:
    """How much the process signal carries: the spread of R_proc within groups (what the noise floor
    ``mig.min_spread`` is compared with), the share of all gain earned by the first step, and the visual
    evidence ``l_0 - l_0 without the image`` (``mig.visual_evidence``; NaN when not computed)."""
    if batch.l is None:
        return {}
    by_group = batch.r_proc.view(-1, batch.group_size)
    spread = by_group.amax(-1) - by_group.amin(-1)
    total = float(batch.gains.clamp_min(0).sum())
    seen = [float(batch.l[i, 0]) - e for i, e in enumerate(batch.l0_blind) if e is not None]
    return {
        "mig/proc_spread": float(spread.mean()),
        "mig/first_step_share": float(batch.gains[:, :1].clamp_min(0).sum()) / total if total > 0 else float("nan"),
        "mig/visual_evidence": sum(seen) / len(seen) if seen else float("nan"),
    }


def overlong_metrics(batch: RLBatch) -> dict[str, float]:
    """The soft overlong penalty (``reward.overlong_buffer``): its mean and the share of completions it cut;
    absent when the term is off."""
    vals = [v for v in batch.rewards.components.get("overlong", []) if v is not None] if batch.rewards else []
    if not vals:
        return {}
    return {"reward/overlong": sum(vals) / len(vals), "reward/overlong_rate": sum(v < 0 for v in vals) / len(vals)}


def entropy_metrics(batch: RLBatch) -> dict[str, float]:
    """Mean per-token policy entropy (rollout temperature, the update's first pass) over every completion token
    (M_full), over the step tokens (M_cot: the reasoning) and over the rest of the completion (the think/answer
    tags, the answer, EOS); NaN where a set is empty. Absent when the learner computed no entropy."""
    if batch.entropy is None:
        return {}
    full = batch.m_full.bool()
    cot = batch.m_cot.bool() & full

    def mean(mask: torch.Tensor) -> float:
        n = int(mask.sum())
        return float(batch.entropy[mask].sum()) / n if n else float("nan")

    return {"policy/entropy": mean(full), "policy/entropy_reasoning": mean(cot),
            "policy/entropy_answer": mean(full & ~cot)}


def average_diagnostics(diags: list[tuple[int, dict[str, torch.Tensor]]], passes: int) -> dict[str, float]:
    """Per-pass loss diagnostics: additive terms summed over micro-batches, the rest row-weighted means;
    both averaged over the ``passes`` optimisation passes."""
    out: dict[str, float] = {}
    total = sum(n for n, _ in diags) or 1
    for n, d in diags:
        for k, v in d.items():
            w = 1.0 if k in ADDITIVE else n * passes / total
            out[f"loss/{k}"] = out.get(f"loss/{k}", 0.0) + float(v) * w
    return {k: v / passes for k, v in out.items()}

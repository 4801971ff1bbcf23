"""Group-normalised advantages and decoupled token advantages (SPEC section 4).

Rows of every tensor are rollouts laid out group by group: rows ``[g*G, (g+1)*G)`` are the ``G``
completions of prompt ``g`` (the order the rollout engine produces). Per group, with eps = 1e-4:

    A_out_i  = (R_out_i  - mean_j R_out_j)  / (std_j R_out_j  + eps)
    A_proc_i = (R_proc_i - mean_j R_proc_j) / (std_j R_proc_j + eps)

``std`` is the unbiased sample std (``torch.std``), as in TRL's and verl's GRPO. A group whose
rewards are all equal gets exactly 0, never NaN. Token advantages are decoupled: the outcome
advantage covers ``M_full`` (every completion token through EOS), the process advantage ``M_cot``
(the step tokens) only (``process_mask: full`` is the undecoupled ablation: ``M_full`` for both).
A noise floor ``min_spread`` sets the process advantage of a group to 0 when its process rewards spread
over less than that many nats: normalising by a tiny std would turn scoring noise into full-size advantages.

Pure functions on tensors; no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_mig.fields import bounded, check_fields, choice

__all__ = [
    "PROCESS_CREDITS",
    "SCALES",
    "AdvantageConfig",
    "Advantages",
    "GROUP_FILTERS",
    "Normalized",
    "PROCESS_ESTIMATORS",
    "PROCESS_MASKS",
    "PROCESS_SCALES",
    "compute_advantages",
    "equal_outcome_share",
    "flat_groups",
    "group_normalize",
    "normalize",
    "process_token_mask",
    "scale_sums",
    "scale_to_match",
    "step_credit",
    "step_normalize",
    "token_advantages",
    "token_level",
    "trajectory_credit",
    "within_group_credit",
    "zero_std_fraction",
]

SCALES = ("group", "batch", "none")
#: How the process signal is credited to tokens (``PROCESS_ESTIMATORS`` holds each).
PROCESS_CREDITS = ("trajectory", "step")
PROCESS_MASKS = ("cot", "full")
#: How the process advantage is scaled against the outcome advantage after normalisation.
PROCESS_SCALES = ("none", "match_outcome")
#: Dynamic sampling: which signal must spread within a group for the group to be trained on (``flat_groups``).
GROUP_FILTERS = ("none", "outcome", "total", "outcome_and_process")


@dataclass
class AdvantageConfig:
    """How rewards become advantages (SPEC section 4)."""

    scale: str = choice("group", SCALES)  #: divide by the group std ("group"), the batch std ("batch") or nothing
    eps: float = bounded(1e-4, gt=0)  #: added to the std, so a near-constant group cannot blow up
    #: "trajectory": every CoT token gets A_proc_i; "step": step k gets g_k
    process_credit: str = choice("trajectory", PROCESS_CREDITS)
    process_mask: str = choice("cot", PROCESS_MASKS)  #: process-advantage tokens: M_cot (SPEC) | M_full (ablation)
    #: "match_outcome": the process token advantages are rescaled so their root mean square over the batch equals
    #: the outcome advantage's; "none": as normalised (SPEC)
    process_scale: str = choice("none", PROCESS_SCALES)
    #: dynamic sampling (SPEC 4.1): drop groups whose chosen signal does not spread and draw more prompts until the
    #: step has its batch; "outcome": R_out; "total": R_out + R_proc; "outcome_and_process": R_out and R_proc both
    filter_groups: str = choice("none", GROUP_FILTERS)
    #: draws of ``prompts_per_step`` prompts a step may make under ``filter_groups``; then it trains on what it has
    filter_max_draws: int = bounded(4, ge=1)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.process_mask == "full" and self.process_credit == "step":
            raise ValueError("process_mask 'full' needs process_credit 'trajectory': step credit has no value for "
                             "tokens outside the steps")


def _check_groups(n: int, group_size: int) -> int:
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{n} rollouts cannot be split into groups of {group_size}")
    return n // group_size


def _masked_group_normalize(
    values: torch.Tensor, valid: torch.Tensor, group_size: int, scale: str, eps: float, min_spread: float = 0.0
) -> torch.Tensor:
    """Core of both normalisers. ``values``/``valid``: [B, N]; statistics pool each group's valid cells.

    mean_g = sum(v) / n_g;  std_g = sqrt(sum((v - mean_g)^2) / (n_g - 1));  out = (v - mean_g) / (s + eps)
    where s is std_g ("group"), the std over every valid cell of the batch ("batch"), or 1 with
    eps = 0 ("none"). Cells of a group whose valid values are all equal, whose spread (max - min) is
    below ``min_spread``, or with fewer than two valid cells (no spread to measure), are exactly 0;
    invalid cells are 0.
    """
    if scale not in SCALES:
        raise ValueError(f"advantage scale must be one of {SCALES}, got {scale!r}")
    b, n = values.shape
    n_groups = _check_groups(b, group_size)
    if n == 0:  # no steps anywhere in the batch
        return torch.zeros(b, 0, dtype=torch.float32, device=values.device)
    v = torch.where(valid, values.float(), 0.0)
    vg = v.reshape(n_groups, group_size * n)
    mg = valid.reshape(n_groups, group_size * n)
    cnt = mg.sum(-1, keepdim=True)
    mean = vg.sum(-1, keepdim=True) / cnt.clamp(min=1)
    dev = torch.where(mg, vg - mean, 0.0)
    # A group is "constant" when max == min over its valid cells: the mean of equal floats need not
    # round back to the same float, so dev could be ~1e-17 instead of 0; force exact zeros instead.
    big = torch.finfo(vg.dtype).max
    vmax = torch.where(mg, vg, -big).amax(-1, keepdim=True)
    vmin = torch.where(mg, vg, big).amin(-1, keepdim=True)
    constant = (vmax <= vmin) | (vmax - vmin < min_spread) | (cnt < 2)
    if scale == "group":
        std = (dev.square().sum(-1, keepdim=True) / (cnt - 1).clamp(min=1)).sqrt()
        out = dev / (std + eps)
    elif scale == "batch":
        # Group means stay (each prompt is its own baseline); only the scale is shared, from the raw
        # values of the whole batch, as TRL's scale_rewards="batch".
        n_all = valid.sum()
        if n_all >= 2:
            flat = v[valid]
            std = flat.std()
        else:
            std = torch.zeros((), dtype=v.dtype, device=v.device)
        out = dev / (std + eps)
    else:
        out = dev
    out = torch.where(constant | ~mg, 0.0, out)
    return out.reshape(b, n)


def group_normalize(
    rewards: torch.Tensor, group_size: int, *, scale: str = AdvantageConfig.scale, eps: float = AdvantageConfig.eps,
    min_spread: float = 0.0,
) -> torch.Tensor:
    """Sequence advantages [B] from rewards [B]: ``A_i = (R_i - mean_g R) / (std_g R + eps)``.

    ``scale="batch"`` divides by the std of all rewards of the batch instead (group means kept);
    ``scale="none"`` only subtracts the group mean (Dr. GRPO). Constant groups, groups whose rewards
    spread over less than ``min_spread``, and groups of one rollout, give exactly 0. Returns float32.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    r = rewards.reshape(-1, 1)
    return _masked_group_normalize(r, torch.ones_like(r, dtype=torch.bool), group_size, scale, eps,
                                   min_spread).reshape(-1)


def step_normalize(
    step_gains: torch.Tensor,
    step_mask: torch.Tensor,
    group_size: int,
    *,
    scale: str = AdvantageConfig.scale,
    eps: float = AdvantageConfig.eps,
    min_spread: float = 0.0,
) -> torch.Tensor:
    """Step advantages [B, K] from the per-step gains ``g_k`` [B, K] (``process_credit: step``).

    Column ``k`` holds step ``k + 1`` (``g_1`` is column 0); ``step_mask`` [B, K] marks the real steps
    (row i has K_i leading True). Normalised over **all steps of the group** (SPEC section 4):
    ``(g_ik - mean) / (std + eps)`` with mean and std over the valid cells of the group's rows;
    ``scale`` as in ``group_normalize`` (``"batch"``: std over every valid step of the batch); a group
    whose step gains spread over less than ``min_spread`` gets 0. Padding cells are 0.
    """
    if step_gains.shape != step_mask.shape or step_gains.dim() != 2:
        raise ValueError(
            f"step_gains {tuple(step_gains.shape)} and step_mask {tuple(step_mask.shape)} must be the same [B, K]"
        )
    return _masked_group_normalize(step_gains, step_mask.bool(), group_size, scale, eps, min_spread)


def _flat(values: torch.Tensor, group_size: int, min_spread: float = 0.0) -> torch.Tensor:
    """[groups] bool: the group's values are all equal, or spread (max - min) over less than ``min_spread``."""
    v = values.float().reshape(_check_groups(values.numel(), group_size), group_size)
    spread = v.amax(-1) - v.amin(-1)
    return (spread <= 0) | (spread < min_spread)


def zero_std_fraction(rewards: torch.Tensor, group_size: int, min_spread: float = 0.0) -> float:
    """Fraction of groups whose rewards are all equal, or spread over less than ``min_spread`` (they carry
    no GRPO signal); a logged metric."""
    return float(_flat(rewards, group_size, min_spread).float().mean())


def process_token_mask(m_full: torch.Tensor, m_cot: torch.Tensor,
                       process_mask: str = AdvantageConfig.process_mask) -> torch.Tensor:
    """The tokens the process advantage covers: ``M_cot`` (decoupled, SPEC) or ``M_full`` (the ablation)."""
    if process_mask not in PROCESS_MASKS:
        raise ValueError(f"process_mask must be one of {PROCESS_MASKS}, got {process_mask!r}")
    return m_full if process_mask == "full" else m_cot


def token_advantages(
    seq_adv: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    step_adv: torch.Tensor | None = None,
    token_step: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token advantages [B, T], zero outside ``mask``.

    * Trajectory credit: ``A[i, t] = seq_adv[i] * mask[i, t]``.
    * Step credit (``step_adv`` [B, K] and ``token_step`` [B, T] given): ``A[i, t] = step_adv[i, s]``
      where ``s = token_step[i, t]`` is the 0-based index of the step that token belongs to and
      ``-1`` marks tokens of no step; tokens outside ``mask`` or with ``s = -1`` get 0. A step index
      at or beyond ``K`` is an error (it would mean the segmenter and the scorer disagree).
    """
    m = mask.bool()
    if step_adv is None:
        if seq_adv is None:
            raise ValueError("token_advantages needs seq_adv, or step_adv with token_step")
        if seq_adv.shape != m.shape[:1]:
            raise ValueError(f"seq_adv {tuple(seq_adv.shape)} does not match mask {tuple(m.shape)}")
        return torch.where(m, seq_adv.float().unsqueeze(-1), 0.0)
    if token_step is None:
        raise ValueError("step credit needs token_step [B, T] (step index per token, -1 outside steps)")
    if token_step.shape != m.shape or step_adv.shape[0] != m.shape[0]:
        raise ValueError(
            f"token_step {tuple(token_step.shape)}, mask {tuple(m.shape)} and step_adv {tuple(step_adv.shape)} "
            "disagree"
        )
    k = step_adv.shape[1]
    ts = token_step.long()
    in_step = m & (ts >= 0)
    if bool((ts[in_step] >= k).any()):
        raise ValueError(f"token_step has a step index >= K = {k}")
    idx = ts.clamp(min=0, max=max(k - 1, 0))
    if k == 0:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    gathered = step_adv.float().gather(1, idx)
    return torch.where(in_step, gathered, 0.0)


@dataclass
class Advantages:
    """Everything section 4 produces for one rollout batch."""

    seq_out: torch.Tensor  #: [B] A_out per rollout
    seq_proc: torch.Tensor  #: [B] A_proc per rollout (trajectory credit; also logged under step credit)
    tok_out: torch.Tensor  #: [B, T] A_out on M_full, 0 elsewhere
    tok_proc: torch.Tensor  #: [B, T] process advantage on M_cot, 0 elsewhere
    zero_std_out: float  #: fraction of groups with constant R_out
    zero_std_proc: float  #: fraction of groups with constant R_proc
    below_min_spread: float = 0.0  #: fraction of groups whose R_proc spread is under the noise floor (A_proc 0)
    process_scale: float = 1.0  #: the factor ``process_scale: match_outcome`` multiplied the process advantage by


@dataclass
class Normalized:
    """The rewards of a batch normalised within their groups (``normalize``): rows as given, no tokens yet."""

    seq_out: torch.Tensor  #: [B] A_out
    seq_proc: torch.Tensor  #: [B] A_proc
    step_adv: torch.Tensor | None = None  #: [B, K] normalised step gains (``process_credit: step``)

    def rows(self, which) -> Normalized:
        """The rows ``which`` (an index or slice): a process's share of advantages normalised over all processes."""
        return Normalized(self.seq_out[which], self.seq_proc[which],
                          None if self.step_adv is None else self.step_adv[which])


def normalize(r_out: torch.Tensor, r_proc: torch.Tensor, group_size: int, cfg: AdvantageConfig, *,
              min_spread: float = 0.0, step_gains: torch.Tensor | None = None,
              step_mask: torch.Tensor | None = None) -> Normalized:
    """Sequence (and, with ``step_gains``/``step_mask`` [B, K], step) advantages of the rows given: the only
    place rewards are normalised. Rows may come from several processes (``scale: batch``): statistics pool
    every row given, and each process keeps its own (``Normalized.rows``)."""
    a_out = group_normalize(r_out, group_size, scale=cfg.scale, eps=cfg.eps)
    a_proc = group_normalize(r_proc, group_size, scale=cfg.scale, eps=cfg.eps, min_spread=min_spread)
    step_adv = None
    if step_gains is not None:
        if step_mask is None:
            raise ValueError("step gains need their step_mask")
        step_adv = step_normalize(step_gains, step_mask, group_size, scale=cfg.scale, eps=cfg.eps,
                                  min_spread=min_spread)
    return Normalized(a_out, a_proc, step_adv)


def trajectory_credit(norm: Normalized, m_proc: torch.Tensor, m_cot: torch.Tensor,
                      token_step: torch.Tensor | None) -> torch.Tensor:
    """``process_credit: trajectory``: every token of ``m_proc`` gets its rollout's A_proc."""
    return token_advantages(norm.seq_proc, m_proc)


def step_credit(norm: Normalized, m_proc: torch.Tensor, m_cot: torch.Tensor,
                token_step: torch.Tensor | None) -> torch.Tensor:
    """``process_credit: step``: each token of step k gets the normalised ``g_k`` of its step."""
    if norm.step_adv is None or token_step is None:
        raise ValueError("process_credit='step' needs step_gains, step_mask and token_step")
    return token_advantages(None, m_cot, step_adv=norm.step_adv, token_step=token_step)


#: ``process_credit`` -> how the normalised process signal becomes token advantages
PROCESS_ESTIMATORS = {"trajectory": trajectory_credit, "step": step_credit}


def token_level(norm: Normalized, r_out: torch.Tensor, r_proc: torch.Tensor, m_full: torch.Tensor,
                m_cot: torch.Tensor, group_size: int, cfg: AdvantageConfig, *, token_step: torch.Tensor | None = None,
                min_spread: float = 0.0) -> Advantages:
    """``Advantages`` of this process's rows from their normalised values: the decoupled token advantages
    (outcome on M_full, process by the ``process_credit`` estimator) and the logged group shares."""
    return Advantages(
        seq_out=norm.seq_out,
        seq_proc=norm.seq_proc,
        tok_out=token_advantages(norm.seq_out, m_full),
        tok_proc=PROCESS_ESTIMATORS[cfg.process_credit](norm, process_token_mask(m_full, m_cot, cfg.process_mask),
                                                        m_cot, token_step),
        zero_std_out=zero_std_fraction(r_out, group_size),
        zero_std_proc=zero_std_fraction(r_proc, group_size),
        below_min_spread=zero_std_fraction(r_proc, group_size, min_spread),
    )


def compute_advantages(
    r_out: torch.Tensor,
    r_proc: torch.Tensor,
    m_full: torch.Tensor,
    m_cot: torch.Tensor,
    group_size: int,
    cfg: AdvantageConfig | None = None,
    *,
    step_gains: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    token_step: torch.Tensor | None = None,
    min_spread: float = 0.0,
) -> Advantages:
    """Sequence and decoupled token advantages for a batch (SPEC section 4): ``normalize``, then ``token_level``.

    ``r_out``, ``r_proc``: [B]; ``m_full``, ``m_cot``: [B, T] completion masks. With
    ``cfg.process_credit == "step"`` also pass ``step_gains``/``step_mask`` [B, K] (``g_1..g_K``,
    left-aligned) and ``token_step`` [B, T] (0-based step of each token, -1 for non-step tokens).
    ``min_spread``: the process noise floor in nats (``mig.min_spread``); groups under it get A_proc = 0.
    """
    cfg = cfg or AdvantageConfig()
    if m_full.shape != m_cot.shape or m_full.shape[0] != r_out.shape[0] or r_proc.shape != r_out.shape:
        raise ValueError(
            f"shapes disagree: r_out {tuple(r_out.shape)}, r_proc {tuple(r_proc.shape)}, "
            f"m_full {tuple(m_full.shape)}, m_cot {tuple(m_cot.shape)}"
        )
    if cfg.process_credit == "step" and (step_gains is None or step_mask is None or token_step is None):
        raise ValueError("process_credit='step' needs step_gains, step_mask and token_step")
    step = {"step_gains": step_gains, "step_mask": step_mask} if cfg.process_credit == "step" else {}
    norm = normalize(r_out, r_proc, group_size, cfg, min_spread=min_spread, **step)
    return token_level(norm, r_out, r_proc, m_full, m_cot, group_size, cfg, token_step=token_step,
                       min_spread=min_spread)


def scale_sums(tok: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """``(sum of squares, count)`` of the token advantages under ``mask``: what ``scale_to_match`` needs, in a
    form that adds up over processes."""
    m = mask.bool()
    return float(tok.float()[m].square().sum()), float(m.sum())


def scale_to_match(out_sums: tuple[float, float], proc_sums: tuple[float, float]) -> float:
    """The factor that gives the process token advantages the root mean square of the outcome ones
    (``advantage.process_scale: match_outcome``), from ``scale_sums`` of each (over the global batch); 1 when
    either is all zero (nothing to match, or nothing to scale)."""
    (so, no), (sp, npr) = out_sums, proc_sums
    if so <= 0 or sp <= 0 or no <= 0 or npr <= 0:
        return 1.0
    return float((so / no) ** 0.5 / (sp / npr) ** 0.5)


def equal_outcome_share(r_out: torch.Tensor, tok_proc: torch.Tensor, group_size: int) -> float:
    """The share of the process advantage (sum of |A_proc| over tokens) that sits in groups whose outcome rewards
    are all equal, where the outcome advantage, and so GRPO, has no gradient; NaN when there is none at all."""
    rg = r_out.reshape(_check_groups(r_out.numel(), group_size), group_size)
    equal = (rg.amax(-1) == rg.amin(-1)).repeat_interleave(group_size)
    mass = tok_proc.float().abs().sum(-1)
    total = float(mass.sum())
    return float(mass[equal].sum()) / total if total > 0 else float("nan")


def within_group_credit(
    correct: torch.Tensor, r_proc: torch.Tensor, a_out: torch.Tensor, a_proc: torch.Tensor, group_size: int
) -> dict[str, float]:
    """How the process reward relates to the outcome where the advantage looks: inside each group.

    Pooling rollouts across prompts mixes easy and hard items (whose R_proc levels differ for reasons that
    have nothing to do with the rollout), so every statistic here compares rollouts of the same group only.
    ``correct`` [B] (1 for a right answer), ``r_proc``, ``a_out``, ``a_proc`` [B]. Returns:

    * ``mixed_groups``: groups with at least one right and one wrong rollout;
    * ``correct_higher`` / ``correct_lower``: the share of those groups where the right rollouts' mean R_proc
      is above / below the wrong ones' (ties count in neither);
    * ``corr_groups``: groups where both A_out and A_proc vary;
    * ``corr``: the mean over those groups of the Pearson correlation of A_proc with A_out (NaN if none).
    """
    n_groups = _check_groups(correct.numel(), group_size)
    c = correct.float().view(n_groups, group_size) > 0.5
    rp = r_proc.float().view(n_groups, group_size)
    mixed = c.any(-1) & (~c).any(-1)
    right = torch.where(c, rp, 0.0).sum(-1) / c.sum(-1).clamp_min(1)
    wrong = torch.where(~c, rp, 0.0).sum(-1) / (~c).sum(-1).clamp_min(1)
    n_mixed = int(mixed.sum())
    ao = a_out.float().view(n_groups, group_size)
    ap = a_proc.float().view(n_groups, group_size)
    ao, ap = ao - ao.mean(-1, keepdim=True), ap - ap.mean(-1, keepdim=True)
    so, sp = ao.pow(2).sum(-1).sqrt(), ap.pow(2).sum(-1).sqrt()
    varies = (so > 1e-12) & (sp > 1e-12)
    corr = (ao * ap).sum(-1) / (so * sp).clamp_min(1e-12)
    return {
        "mixed_groups": float(n_mixed),
        "correct_higher": float((mixed & (right > wrong)).sum()) / n_mixed if n_mixed else float("nan"),
        "correct_lower": float((mixed & (right < wrong)).sum()) / n_mixed if n_mixed else float("nan"),
        "corr_groups": float(varies.sum()),
        "corr": float(corr[varies].mean()) if bool(varies.any()) else float("nan"),
    }


def flat_groups(r_out: torch.Tensor, r_proc: torch.Tensor | None, group_size: int, signal: str,
                min_spread: float) -> torch.Tensor:
    """[B] bool: the groups whose ``signal`` does not spread, the ones dynamic sampling drops (SPEC 4.1).

    ``outcome``: R_out all equal (the outcome advantage is 0: GRPO's zero-std groups, DAPO's filter);
    ``outcome_and_process``: that, and R_proc spreading over less than ``min_spread`` (its advantage is 0 too:
    neither term has a gradient); ``total``: R_out + R_proc, one summed reward per rollout, spreading over less
    than ``min_spread`` (a process reward folded into the score, as frameworks that filter on a summed score do);
    ``none``: no group. Spreads are max - min, the quantity the normalisers compare with ``min_spread``.
    ``r_proc`` may be None for ``none`` and ``outcome``."""
    if signal not in GROUP_FILTERS:
        raise ValueError(f"filter_groups must be one of {GROUP_FILTERS}, got {signal!r}")
    if signal == "none":
        return torch.zeros(_check_groups(r_out.numel(), group_size), dtype=torch.bool)
    flat_out = _flat(r_out, group_size)
    if signal == "outcome":
        return flat_out
    if r_proc is None:
        raise ValueError(f"filter_groups {signal!r} reads R_proc: score the groups first")
    if signal == "outcome_and_process":
        return flat_out & _flat(r_proc, group_size, min_spread)
    return _flat(r_out.float() + r_proc.float(), group_size, min_spread)

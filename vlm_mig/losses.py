"""The training objective (SPEC section 5) as pure functions of per-token log-probs and masks.

    L_total = alpha * PG(A_proc, M_cot) + beta * PG(A_out, M_full) + kl_coef * KL(pi_theta || pi_ref)
              + gamma * L_sft

    PG(A, M) = - sum_i sum_t w_i * M_it * min(r_it A_it, clip(r_it, 1 - eps_lo, 1 + eps_hi) A_it) / D
    r_it     = exp(log pi_theta(z_it) - log pi_old(z_it))

Normalisers (``w_i``, ``D``), chosen by ``LossConfig.normalizer``:
  * ``grpo``    (default): w_i = 1 / |M_i| (token mean per sequence), D = B (then a batch mean);
  * ``dapo``:    w_i = 1, D = sum_i |M_i| (every token of the batch weighs the same);
  * ``dr_grpo``: w_i = 1, D = B * L with the constant L = ``max_completion_length`` (Dr. GRPO).

KL uses the k3 estimator ``exp(q - p) - (q - p) - 1`` (p = log pi_theta, q = log pi_ref), averaged
over ``M_full`` with the same normaliser as the outcome term. The dual-gated SFT term is

    L_sft = - (1 / N_gate) * sum_{i gated} (1 / |z_i|) sum_t log pi_theta(z_it)

over rollouts with ``fmt = 1`` and ``acc = 1`` (and optionally ``R_proc > 0``); ``N_gate = 0`` gives
exactly 0 with a valid (all-zero) gradient. ``sft_gates: format`` or ``accuracy`` keeps one gate only
(the single-gate ablations).

The GRPO baseline is this same code with ``alpha = 0`` and ``gamma = 0``.

Variants (SPEC section 5.1; each off by default):
  * ``mask_truncated``: rows whose completion hit ``max_new_tokens`` without an EOS leave the masks of both PG terms
    and of KL (TRL ``mask_truncated_completions``, DAPO's overlong filtering), and the ``D`` computed from them;
  * ``importance_sampling: sequence`` (GSPO): ``r_it = s_i = exp(mean_{t in M_i} (log pi_theta - log pi_old))`` for
    every token of row i, each term's ``s_i`` over that term's own mask; the gradient of token t is ``s_i grad
    log pi_theta(z_it)`` (GSPO-token, equal to GSPO's and TRL's when ``A`` is constant along the row);
  * ``type: cispo`` (MiniMax-M1): per token ``- sg(clip(r_it, 1 - eps_lo, 1 + eps_hi)) * A_it * log pi_theta(z_it)``
    in place of the PPO surrogate, with the same ``w_i`` and ``D``;
  * ``top_entropy_quantile = q < 1`` (Wang et al. 2025, TRL): only the tokens whose entropy is at or above the
    ``1 - q`` quantile of the entropies over ``M_full`` of the rows given (one micro-batch) get policy gradient in
    either term; ``w_i`` and ``D`` stay those of the unselected masks.

Every function takes tensors and returns tensors; the trainer stays the only stateful piece. All
arithmetic is fp32 whatever the input dtype, and masked-out positions are replaced (not multiplied)
by zeros before any ``exp``, so padding with garbage log-probs can produce neither NaN nor inf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlm_mig.fields import bounded, check_fields, choice

__all__ = [
    "IMPORTANCE_SAMPLING",
    "LOG_RATIO_CLAMP",
    "LOSS_TYPES",
    "ROLLOUT_CORRECTIONS",
    "NORMALIZERS",
    "SFT_GATES",
    "Denominators",
    "LossConfig",
    "LossInputs",
    "drop_rows",
    "high_entropy_mask",
    "k3_kl",
    "masked_mean",
    "pg_loss",
    "rollout_correction",
    "sft_gate",
    "sft_loss",
    "total_loss",
]

NORMALIZERS = ("grpo", "dapo", "dr_grpo")
#: Which of the structural (format) and factual (accuracy) SFT gates a rollout must pass.
SFT_GATES = ("both", "format", "accuracy")
#: The ratio of a token: its own ("token", PPO/GRPO) or its sequence's geometric mean over the term's mask (GSPO).
IMPORTANCE_SAMPLING = ("token", "sequence")
#: The policy-gradient surrogate: PPO's clipped ratio, or CISPO's clipped stop-gradient weight on log pi_theta.
LOSS_TYPES = ("ppo", "cispo")
#: How the update corrects for rollouts sampled by another engine than the trainer's pass (vLLM): importance weights
#: pi_old / pi_sampler per token or per sequence, capped ("truncate") or dropped above the cap ("mask").
ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
#: |log r| is clamped here before exp (as verl does): exp(20) ~ 5e8 keeps fp32 finite for any input.
LOG_RATIO_CLAMP = 20.0


@dataclass
class LossConfig:
    """Weights and options of L_total (SPEC section 5); the trainer's config embeds this."""

    alpha: float = bounded(1.0, ge=0)  #: weight of the process term PG(A_proc, M_cot); 0 for the GRPO baseline
    beta: float = bounded(1.0, ge=0)  #: weight of the outcome term PG(A_out, M_full)
    gamma: float = bounded(0.1, ge=0)  #: weight of the dual-gated SFT term; 0 for the GRPO baseline
    kl_coef: float = bounded(0.04, ge=0)  #: weight of KL(pi_theta || pi_ref) (k3); 0 disables the reference model
    eps_clip: float = bounded(0.2, ge=0, lt=1)  #: PPO clip range: r is clipped to [1 - eps_clip, 1 + eps_clip_high]
    eps_clip_high: float | None = bounded(None, ge=0)  #: upper clip (DAPO "clip-higher"); None means eps_clip
    #: "grpo" (per-sequence mean, then batch mean) | "dapo" (tokens) | "dr_grpo" (a constant)
    normalizer: str = choice("grpo", NORMALIZERS)
    max_completion_length: int | None = bounded(None, ge=1)  #: the constant L of "dr_grpo"; None: the batch width T
    sft_gate_proc: bool = False  #: third SFT gate R_proc > 0 (drops correct answers no step led to)
    sft_gates: str = choice("both", SFT_GATES)  #: "both" (format and accuracy, SPEC) | one of them (ablations)
    mask_truncated: bool = False  #: rows that hit max_new_tokens (no EOS) get no PG or KL loss (TRL, DAPO)
    #: "token" (PPO/GRPO ratio per token) | "sequence" (GSPO: one ratio per row and term, clipped per row)
    importance_sampling: str = choice("token", IMPORTANCE_SAMPLING)
    type: str = choice("ppo", LOSS_TYPES)  #: "ppo" (clipped surrogate) | "cispo" (sg(clipped ratio) * A * log pi)
    cispo_eps_high: float = bounded(4.0, ge=0)  #: CISPO weight cap 1 + this (4: TRL's recommended cap 5, ScaleRL)
    cispo_eps_low: float | None = bounded(None, ge=0, le=1)  #: CISPO weight floor 1 - this; None: no floor (TRL)
    top_entropy_quantile: float = bounded(1.0, gt=0, le=1)  #: PG only on the top-q entropy tokens of the rows; 1: all
    #: PG weighted by pi_old / pi_sampler of each token ("token_*") or row ("sequence_*"), capped or masked above
    #: the cap: corrects rollouts from another sampler (vLLM); "none" leaves the update as it is
    rollout_correction: str = choice("none", ROLLOUT_CORRECTIONS)
    rollout_correction_cap: float = bounded(3.0, gt=1)  #: the cap C of the weights (TRL's clip_max default, 3)

    def __post_init__(self) -> None:
        check_fields(self)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 when the mask is empty."""
    m = mask.bool()
    return torch.where(m, x.float(), 0.0).sum() / m.sum().clamp(min=1)


def _token_weights(mask: torch.Tensor, normalizer: str) -> torch.Tensor:
    """``w_i * M_it`` as floats: 1/|M_i| per token for "grpo", 1 per token otherwise."""
    m = mask.float()
    if normalizer == "grpo":
        return m / m.sum(-1, keepdim=True).clamp(min=1.0)
    return m


@dataclass(frozen=True)
class Denominators:
    """The ``D`` of each term; computed on the **whole** batch when it is split into micro-batches.

    With the full-batch values, summing the losses of the micro-batches gives exactly the loss of
    the whole batch (each term is a sum over rows divided by a batch constant), so gradient
    accumulation needs no rescaling.
    """

    cot: float  #: D of PG(A_proc, M_cot)
    full: float  #: D of PG(A_out, M_full) and of KL
    sft: float  #: number of rollouts passing the SFT gates (clamped to >= 1)

    @staticmethod
    def of(mask: torch.Tensor, normalizer: str, max_completion_length: int | None = None) -> float:
        """``D`` for one mask [B, T]: B ("grpo"), total tokens ("dapo"), B * L ("dr_grpo")."""
        if normalizer not in NORMALIZERS:
            raise ValueError(f"loss normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        b, t = mask.shape
        if normalizer == "grpo":
            return float(max(b, 1))
        if normalizer == "dapo":
            return float(max(int(mask.bool().sum()), 1))
        return float(max(b, 1) * (max_completion_length or t))

    @classmethod
    def from_batch(
        cls, m_cot: torch.Tensor, m_full: torch.Tensor, gate: torch.Tensor, cfg: LossConfig,
        total: Callable[[list[float]], list[float]] | None = None, truncated: torch.Tensor | None = None,
    ) -> Denominators:
        """Denominators of the batch ``(m_cot, m_full, gate)`` under ``cfg``. When the batch is split over
        processes, ``total`` sums each process's raw values (before the gated count is clamped to 1), so every
        process divides by the global batch's. With ``cfg.mask_truncated``, the rows flagged in ``truncated`` ([B]
        bool) leave both masks first, as TRL zeroes their completion mask before counting its token denominator:
        only "dapo"'s ``D`` changes (a row still counts in "grpo"'s B and "dr_grpo"'s B * L)."""
        if cfg.mask_truncated and truncated is not None:
            m_cot, m_full = drop_rows(m_cot, truncated), drop_rows(m_full, truncated)
        raw = [cls.of(m_cot, cfg.normalizer, cfg.max_completion_length),
               cls.of(m_full, cfg.normalizer, cfg.max_completion_length), float(gate.bool().sum())]
        cot, full, gated = raw if total is None else total(raw)
        return cls(cot=cot, full=full, sft=max(gated, 1.0))


def drop_rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``mask`` [B, T] as bool with the rows flagged in ``rows`` ([B] bool) all False."""
    return mask.bool() & ~rows.bool().to(mask.device).unsqueeze(-1)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Bool [B, T]: the tokens of ``mask`` whose ``entropy`` is at or above the ``1 - quantile`` quantile (linear
    interpolation, ``torch.quantile``) of the entropies of all the masked tokens given, i.e. the top ``quantile``
    share of them; TRL's ``get_high_entropy_mask`` (one threshold for the batch, not one per sequence). No masked
    token gives all False."""
    m = mask.bool()
    ent = entropy.detach().float()
    values = ent[m]
    if values.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (ent >= threshold) & m


def _clamped_log_ratio(logp: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logp - other`` on the mask, 0 elsewhere, clamped to +-LOG_RATIO_CLAMP (finite exp, finite grad)."""
    m = mask.bool()
    d = torch.where(m, logp.float(), 0.0) - torch.where(m, other.float(), 0.0)
    return d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_clip: float = LossConfig.eps_clip,
    eps_clip_high: float | None = None,
    normalizer: str = LossConfig.normalizer,
    denom: float | None = None,
    max_completion_length: int | None = None,
    importance_sampling: str = LossConfig.importance_sampling,
    loss_type: str = LossConfig.type,
    cispo_eps_high: float = LossConfig.cispo_eps_high,
    cispo_eps_low: float | None = None,
    keep: torch.Tensor | None = None,
    rollout_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient term ``PG(A, M)`` (formula in the module docstring).

    ``logp``, ``old_logp``, ``mask``: [B, T]; ``advantages``: [B, T] per token, or [B] per sequence
    (broadcast over the tokens). ``denom`` overrides ``D`` (use ``Denominators`` for micro-batches).

    ``importance_sampling="sequence"`` (GSPO) gives every token of row i the ratio ``s_i = exp(mean over
    M_i of (logp - old_logp))`` with the gradient ``s_i * grad logp_it`` (the paper's GSPO-token form
    ``sg(s_i) * pi/sg(pi)``: for a row-constant advantage its loss, clipping and gradient equal GSPO's and TRL's
    ``exp((log_ratio * mask).sum(-1) / mask.sum(-1))``; with per-token advantages each token keeps its own).
    ``loss_type="cispo"`` makes the per-token term ``- sg(clip(r, 1 - cispo_eps_low, 1 + cispo_eps_high)) * A *
    logp`` (no floor when ``cispo_eps_low`` is None). ``keep`` [B, T] bool: only these tokens of ``mask`` get the
    policy gradient (``high_entropy_mask``); ``w_i`` and ``D`` stay those of ``mask``. ``rollout_weight`` [B, T]
    (``rollout_correction``, no gradient) multiplies each token's term.

    Returns the loss and detached diagnostics: ``clip_frac`` (masked tokens where the clipped branch
    is the active one: ``r < 1 - eps`` with ``A < 0``, or ``r > 1 + eps_high`` with ``A > 0``, i.e.
    where the token gets no gradient; for CISPO, tokens whose weight was clipped, whatever the sign of ``A``),
    ``clip_frac_low``, ``clip_frac_high``; with "sequence", ``seq_ratio_mean`` (mean ``s_i`` over the rows with a
    masked token); with ``keep``, ``entropy_kept_frac`` (share of the masked tokens kept).
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"loss normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, got {importance_sampling!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)}"
        )
    m = mask.bool()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(logp)
    if adv.shape != logp.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} do not match logp {tuple(logp.shape)}")
    adv = torch.where(m, adv, 0.0)
    hi = eps_clip if eps_clip_high is None else eps_clip_high
    log_ratio = _clamped_log_ratio(logp, old_logp, m)
    diag: dict[str, torch.Tensor] = {}
    if importance_sampling == "sequence":
        rows = m.any(-1)
        log_s = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
        log_ratio = torch.where(m, log_s.detach() + log_ratio - log_ratio.detach(), 0.0)  # value s_i, grad per token
        with torch.no_grad():
            s = log_s.squeeze(-1).exp()
            diag["seq_ratio_mean"] = torch.where(rows, s, 0.0).sum() / rows.sum().clamp(min=1)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        lo_c = None if cispo_eps_low is None else 1.0 - cispo_eps_low
        weight = ratio.detach().clamp(min=lo_c, max=1.0 + cispo_eps_high)
        per_tok = -weight * adv * torch.where(m, logp.float(), 0.0)
    else:
        surr1 = ratio * adv
        surr2 = ratio.clamp(1.0 - eps_clip, 1.0 + hi) * adv
        per_tok = -torch.minimum(surr1, surr2)
    if keep is not None:
        per_tok = torch.where(keep.bool() & m, per_tok, 0.0)
    if rollout_weight is not None:
        per_tok = per_tok * rollout_weight.detach().float()
    w = _token_weights(m, normalizer)
    d = denom if denom is not None else Denominators.of(m, normalizer, max_completion_length)
    loss = (per_tok * w).sum() / d
    with torch.no_grad():
        r = ratio.detach()
        if loss_type == "cispo":
            low = (r < lo_c) & m if lo_c is not None else torch.zeros_like(m)
            high = (r > 1.0 + cispo_eps_high) & m
        else:
            low = (r < 1.0 - eps_clip) & (adv < 0) & m
            high = (r > 1.0 + hi) & (adv > 0) & m
        n = m.sum().clamp(min=1)
        diag.update({
            "clip_frac": (low | high).sum() / n,
            "clip_frac_low": low.sum() / n,
            "clip_frac_high": high.sum() / n,
        })
        if keep is not None:
            diag["entropy_kept_frac"] = (keep.bool() & m).sum() / n
    return loss, diag


def rollout_correction(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       mode: str = LossConfig.rollout_correction,
                       cap: float = LossConfig.rollout_correction_cap) -> tuple[torch.Tensor | None, dict]:
    """Importance weights of rollouts another engine sampled, and how far its distribution is from the trainer's.

    ``d_t = log pi_old(z_t) - log pi_sampler(z_t)`` on ``mask`` ([B, T], both at the rollout temperature). Token
    modes weigh each token by ``exp(d_t)``, sequence modes every token of row i by ``exp(sum_t d_t)``; "truncate"
    caps the weight at ``cap``, "mask" sets it to 0 above ``cap`` (TRL's ``vllm_importance_sampling_mode``,
    from "Your efficient RL framework secretly brings you off-policy RL training", Yao et al. 2025). Returns the
    weights ([B, T], detached; None for "none") and diagnostics that hold whatever the mode:
    ``rollout_logp_diff`` (mean |d_t|), ``rollout_kl`` (the k3 estimate of KL(pi_sampler || pi_old) on the
    sampled tokens, ``exp(d) - 1 - d``), and with a correction ``rollout_capped_frac`` (share of the masked
    tokens, or rows, whose weight went over the cap).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout_correction must be one of {ROLLOUT_CORRECTIONS}, got {mode!r}")
    m = mask.bool()
    d = _clamped_log_ratio(old_logp.detach(), sampler_logp, m)
    diag = {"rollout_logp_diff": masked_mean(d.abs(), m), "rollout_kl": masked_mean(torch.exp(d) - 1.0 - d, m)}
    if mode == "none":
        return None, diag
    if mode.startswith("sequence"):
        rows = m.any(-1)
        r = torch.exp(d.sum(-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(d)
        over = (r[:, 0] > cap) & rows
        diag["rollout_capped_frac"] = over.sum() / rows.sum().clamp(min=1)
    else:
        r = torch.exp(d)
        over = (r > cap) & m
        diag["rollout_capped_frac"] = over.sum() / m.sum().clamp(min=1)
    weight = r.clamp(max=cap) if mode.endswith("truncate") else torch.where(r > cap, 0.0, r)
    return torch.where(m, weight, 0.0), diag


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): ``exp(q - p) - (q - p) - 1`` (>= 0), 0 off mask.

    Unbiased for the KL under samples of pi_theta, and always non-negative (Schulman's k3, as GRPO).
    """
    d = _clamped_log_ratio(ref_logp, logp, mask)  # q - p
    return torch.where(mask.bool(), torch.exp(d) - d - 1.0, 0.0)


def sft_gate(
    acc: torch.Tensor, fmt: torch.Tensor, r_proc: torch.Tensor | None = None, *, gate_proc: bool = False,
    gates: str = LossConfig.sft_gates,
) -> torch.Tensor:
    """Bool [B]: rollouts that pass the structural gate (``fmt = 1``) and the factual gate (``acc = 1``),
    and, with ``gate_proc``, ``R_proc > 0`` (so a correct answer that no step made likelier, a lucky
    guess, is not imitated). ``gates="format"`` or ``"accuracy"`` keeps only that one of the first two."""
    if gates not in SFT_GATES:
        raise ValueError(f"sft_gates must be one of {SFT_GATES}, got {gates!r}")
    g = torch.ones(acc.shape, dtype=torch.bool, device=acc.device)
    if gates in ("both", "format"):
        g = g & (fmt.float() >= 1.0)
    if gates in ("both", "accuracy"):
        g = g & (acc.float() >= 1.0)
    if gate_proc:
        if r_proc is None:
            raise ValueError("the R_proc > 0 gate needs r_proc")
        g = g & (r_proc.float() > 0)
    return g


def sft_loss(
    logp: torch.Tensor, mask: torch.Tensor, gate: torch.Tensor, *, denom: float | None = None
) -> torch.Tensor:
    """``L_sft = -(1/N_gate) sum_{i gated} mean_t log pi_theta(z_it)`` over ``mask`` (= M_full).

    No gated rollout gives exactly 0, still connected to ``logp`` (gradient all zeros, not None),
    so the trainer's ``backward`` works the same on every batch.
    """
    m = mask.bool()
    w = _token_weights(m, "grpo") * gate.bool().unsqueeze(-1).float()  # 1/|z_i| on gated rows only
    d = denom if denom is not None else float(max(int(gate.bool().sum()), 1))
    return -(torch.where(m, logp.float(), 0.0) * w).sum() / d


@dataclass
class LossInputs:
    """Everything ``L_total`` takes for a batch of rows besides the policy's log-probs: a micro-batch's view of
    an RL batch (``vlm_mig.rl.RLBatch.loss_inputs``), or tensors made by hand."""

    m_full: torch.Tensor  #: [B, T] every completion token through EOS (M_full)
    m_cot: torch.Tensor  #: [B, T] the tokens the process term covers (M_cot, or M_full for the ablation)
    adv_out: torch.Tensor  #: [B, T] outcome token advantages (or [B])
    adv_proc: torch.Tensor  #: [B, T] process token advantages (or [B])
    old_logp: torch.Tensor | None = None  #: [B, T] log pi_old; None: the policy's own detached log-probs
    ref_logp: torch.Tensor | None = None  #: [B, T] log pi_ref (needed when kl_coef > 0)
    acc: torch.Tensor | None = None  #: [B] accuracy (the SFT gates, when gamma > 0 and no ``gate``)
    fmt: torch.Tensor | None = None  #: [B] format
    r_proc: torch.Tensor | None = None  #: [B] R_proc (the third SFT gate)
    gate: torch.Tensor | None = None  #: [B] bool, the SFT gate already computed (``sft_gate``) for these rows
    truncated: torch.Tensor | None = None  #: [B] bool, the completion hit max_new_tokens with no EOS
    #: [B, T] log-prob of each token under the sampler that drew it (``Rollouts.sampler_logp``); None: not reported
    sampler_logp: torch.Tensor | None = None


def total_loss(
    logp: torch.Tensor,
    inputs: LossInputs,
    cfg: LossConfig | None = None,
    *,
    entropy: torch.Tensor | None = None,
    denominators: Denominators | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_total`` and every diagnostic the trainer logs.

    ``logp`` [B, T] log pi_theta of the completion tokens (carries the gradient); ``inputs``: the masks,
    advantages and the rest (``LossInputs``: ``old_logp`` None means ``logp.detach()``, i.e. ``num_iterations
    = 1``; ``ref_logp`` is needed when ``kl_coef > 0``; ``gate``, or ``acc`` and ``fmt`` (and ``r_proc`` for the
    third gate), when ``gamma > 0``; ``truncated`` when ``mask_truncated``); ``entropy`` [B, T] per-token policy
    entropy: logged, and needed when ``top_entropy_quantile < 1``. ``denominators``: full-batch ``Denominators`` when
    this is one micro-batch of several (built with ``truncated`` under ``mask_truncated``, else "dapo"'s ``D`` still
    counts the truncated rows' tokens).

    ``mask_truncated``: truncated rows leave M_cot and M_full in both PG terms and KL (their rows of the per-token
    terms are 0; as TRL, which zeroes their completion mask); the SFT term keeps its own gates. The entropy selection
    (``top_entropy_quantile``) is made once over M_full (after ``mask_truncated``) of the rows given, then intersected
    with each term's mask: a token is a high-entropy "forking" token or not whatever term it is in, so the process
    term keeps the forking tokens of the reasoning (the share kept of M_cot is logged, and need not be q).

    Terms with weight 0 are not computed (their diagnostics are absent), so the GRPO baseline
    (``alpha = gamma = 0``) costs nothing extra. Diagnostics are detached 0-dim tensors (call
    ``.item()`` when logging, once per step): ``loss``, ``pg_proc``, ``pg_out``, ``kl``, ``sft``
    (each unweighted), ``clip_frac_proc``, ``clip_frac_out`` (and ``_low``/``_high``), ``ratio_mean``,
    ``ratio_min``, ``ratio_max`` (over M_full), ``kl_mean`` (token mean of k3 over M_full),
    ``sft_gate_rate``, ``sft_gated``, ``entropy``; ``truncated_frac`` (rows flagged truncated, when given),
    ``seq_ratio_mean_proc``/``_out`` (GSPO), ``entropy_kept_frac_proc``/``_out`` (``top_entropy_quantile < 1``).
    """
    cfg = cfg or LossConfig()
    x = inputs
    old_logp = logp.detach() if x.old_logp is None else x.old_logp
    adv_out, adv_proc, ref_logp = x.adv_out, x.adv_proc, x.ref_logp
    if not (logp.shape == x.m_full.shape == x.m_cot.shape):
        raise ValueError(
            f"logp {tuple(logp.shape)}, m_full {tuple(x.m_full.shape)}, m_cot {tuple(x.m_cot.shape)}"
        )
    mf, mc = x.m_full.bool(), x.m_cot.bool()
    b = logp.shape[0]
    gate = x.gate
    if gate is None and x.acc is not None and x.fmt is not None:
        gate = sft_gate(x.acc, x.fmt, x.r_proc, gate_proc=cfg.sft_gate_proc, gates=cfg.sft_gates)
    elif gate is None and cfg.gamma != 0:
        raise ValueError("gamma > 0 needs the SFT gate, or acc and fmt to compute it")
    if gate is None:
        gate = torch.zeros(b, dtype=torch.bool, device=logp.device)
    truncated = None if x.truncated is None else x.truncated.bool().to(logp.device)
    if cfg.mask_truncated and truncated is None:
        raise ValueError("loss.mask_truncated needs the rows' truncated flags (LossInputs.truncated)")
    den = denominators or Denominators.from_batch(mc, mf, gate, cfg, truncated=truncated)
    if cfg.mask_truncated:  # the masks of the PG terms and KL; the SFT term keeps mf
        mc_pg, mf_pg = drop_rows(mc, truncated), drop_rows(mf, truncated)
    else:
        mc_pg, mf_pg = mc, mf
    keep = None
    if cfg.top_entropy_quantile < 1.0:
        if entropy is None:
            raise ValueError("loss.top_entropy_quantile < 1 needs the per-token entropy (total_loss(entropy=...))")
        if entropy.shape != logp.shape:
            raise ValueError(f"entropy {tuple(entropy.shape)} does not match logp {tuple(logp.shape)}")
        keep = high_entropy_mask(entropy, mf_pg, cfg.top_entropy_quantile)
    weight, rollout_diag = None, {}
    if x.sampler_logp is not None:
        weight, rollout_diag = rollout_correction(old_logp, x.sampler_logp, mf, cfg.rollout_correction,
                                                  cfg.rollout_correction_cap)
    elif cfg.rollout_correction != "none":
        raise ValueError("loss.rollout_correction needs the sampler's log-probs (LossInputs.sampler_logp: sampled "
                         "rollouts with rollout.temperature > 0)")

    def pg(adv: torch.Tensor, mask: torch.Tensor, d: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return pg_loss(
            logp,
            old_logp,
            adv,
            mask,
            eps_clip=cfg.eps_clip,
            eps_clip_high=cfg.eps_clip_high,
            normalizer=cfg.normalizer,
            denom=d,
            importance_sampling=cfg.importance_sampling,
            loss_type=cfg.type,
            cispo_eps_high=cfg.cispo_eps_high,
            cispo_eps_low=cfg.cispo_eps_low,
            keep=keep,
            rollout_weight=weight,
        )

    # Start from 0 * sum(logp) rather than a constant: the result is always attached to logp, so
    # backward() works even when every weight is 0.
    total = 0.0 * torch.where(mf, logp.float(), 0.0).sum()
    diag: dict[str, torch.Tensor] = {}
    if cfg.alpha != 0:
        l_proc, d_proc = pg(adv_proc, mc_pg, den.cot)
        total = total + cfg.alpha * l_proc
        diag["pg_proc"] = l_proc.detach()
        diag.update({f"{k}_proc": v for k, v in d_proc.items()})
    if cfg.beta != 0:
        l_out, d_out = pg(adv_out, mf_pg, den.full)
        total = total + cfg.beta * l_out
        diag["pg_out"] = l_out.detach()
        diag.update({f"{k}_out": v for k, v in d_out.items()})
    if cfg.kl_coef != 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp (or set kl_coef = 0 to drop the reference model)")
        kl_tok = k3_kl(logp, ref_logp, mf_pg)
        kl = (kl_tok * _token_weights(mf_pg, cfg.normalizer)).sum() / den.full
        total = total + cfg.kl_coef * kl
        diag["kl"] = kl.detach()
        diag["kl_mean"] = masked_mean(kl_tok.detach(), mf_pg)
    if cfg.gamma != 0:
        l_sft = sft_loss(logp, mf, gate, denom=den.sft)
        total = total + cfg.gamma * l_sft
        diag["sft"] = l_sft.detach()
    with torch.no_grad():
        diag["loss"] = total.detach()
        ratio = torch.exp(_clamped_log_ratio(logp.detach(), old_logp, mf))
        diag["ratio_mean"] = masked_mean(ratio, mf)
        # min/max over the mask only; an empty mask reads 1 (no token moved), never +-inf.
        if ratio.numel():
            inf = torch.tensor(float("inf"), device=ratio.device)
            any_tok = mf.any()
            diag["ratio_min"] = torch.where(any_tok, torch.where(mf, ratio, inf).amin(), 1.0)
            diag["ratio_max"] = torch.where(any_tok, torch.where(mf, ratio, -inf).amax(), 1.0)
        else:
            diag["ratio_min"] = diag["ratio_max"] = ratio.new_tensor(1.0)
        diag["sft_gated"] = gate.sum().float()
        diag["sft_gate_rate"] = gate.float().mean() if b else ratio.new_tensor(0.0)
        if entropy is not None:
            diag["entropy"] = masked_mean(entropy.detach(), mf)
        if truncated is not None:
            diag["truncated_frac"] = truncated.float().mean() if b else ratio.new_tensor(0.0)
        diag.update(rollout_diag)
    return total, diag

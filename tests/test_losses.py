"""Losses (SPEC section 5), with a group of 4 rollouts worked through by hand from l_k to L_total."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_mig.advantages import AdvantageConfig, compute_advantages, group_normalize
from vlm_mig.losses import (
    Denominators,
    LossConfig,
    LossInputs,
    high_entropy_mask,
    k3_kl,
    pg_loss,
    sft_gate,
    sft_loss,
    total_loss,
)
from vlm_mig.rl.batch import RLBatch
from vlm_mig.rollout.base import Rollouts, assemble_rollouts, completion_mask

EPS = 1e-4
NAN = float("nan")
LN15, LN2 = math.log(1.5), math.log(2.0)


def mig_inline(l: list[float]) -> tuple[list[float], list[float], float]:
    """SPEC section 2, written out here (vlm_mig.mig owns the real one): watermark, gains, R_proc."""
    h, gains = [l[0]], []
    for lk in l[1:]:
        gains.append(max(0.0, lk - h[-1]))
        h.append(max(h[-1], lk))
    return h, gains, sum(gains)


# ----------------------------------------------------------------------------------------------
# The worked example: G = 4 rollouts of one prompt, T = 8 completion tokens
# ----------------------------------------------------------------------------------------------
#
# rollout | acc fmt R_out | l_0..l_K               | watermark h            | gains g_k     | R_proc
# r1      |  1   1   2    | -3, -2, -1.5, -1       | -3, -2, -1.5, -1       | 1, 0.5, 0.5   | 2
# r2      |  1   1   2    | -3, -3.5, -3.2         | -3, -3, -3             | 0, 0          | 0  (lucky guess)
# r3      |  0   1   1    | -3, -4, -2             | -3, -3, -2             | 0, 1          | 1  (recovery: +1 over the
# r4      |  1   0   1    | -3, -2                 | -3, -2                 | 1             | 1   record, not +2
#         |               |                        |                        |               |    over l_1)
#
# R_out = [2, 2, 1, 1]: mean 1.5, deviations +-0.5, unbiased var 4 * 0.25 / 3 = 1/3
#   -> A_out = [a, a, -a, -a], a = 0.5 / (sqrt(1/3) + eps)
# R_proc = [2, 0, 1, 1]: mean 1, deviations [1, -1, 0, 0], unbiased var 2/3
#   -> A_proc = [b, -b, 0, 0], b = 1 / (sqrt(2/3) + eps)
#
# Token layout (step index per token; -1 = a tag/answer/EOS token, P = padding):
#   r1: -1  0  0  1  2 -1 -1 -1     |M_full| = 8, |M_cot| = 4
#   r2: -1  0  1  1 -1 -1 -1  P     |M_full| = 7, |M_cot| = 3
#   r3: -1  0  0  1 -1 -1  P  P     |M_full| = 6, |M_cot| = 3
#   r4: -1  0 -1 -1 -1  P  P  P     |M_full| = 5, |M_cot| = 1
#
# Log-probs: old = ref = -1 on every real token; new = old + ln 1.5 on r1 (ratio 1.5), old + ln 0.5 on
# r3 (ratio 0.5), old elsewhere. Padding holds NaN in all three, which must change nothing.

L = [[-3.0, -2.0, -1.5, -1.0], [-3.0, -3.5, -3.2], [-3.0, -4.0, -2.0], [-3.0, -2.0]]
ACC = torch.tensor([1.0, 1.0, 0.0, 1.0])
FMT = torch.tensor([1.0, 1.0, 1.0, 0.0])
P = -2  # padding marker in the layout below
LAYOUT = torch.tensor(
    [
        [-1, 0, 0, 1, 2, -1, -1, -1],
        [-1, 0, 1, 1, -1, -1, -1, P],
        [-1, 0, 0, 1, -1, -1, P, P],
        [-1, 0, -1, -1, -1, P, P, P],
    ]
)
M_FULL = LAYOUT != P
M_COT = LAYOUT >= 0
TOKEN_STEP = torch.where(LAYOUT >= 0, LAYOUT, -1)
A = 0.5 / (math.sqrt(1 / 3) + EPS)
B = 1.0 / (math.sqrt(2 / 3) + EPS)
C = 0.5 / (math.sqrt(3 / 14) + EPS)  # step credit, see test_worked_example_step_credit


def _logps():
    old = torch.full((4, 8), -1.0)
    new = old.clone()
    new[0] += LN15
    new[2] += math.log(0.5)
    ref = old.clone()
    for t in (old, new, ref):
        t[~M_FULL] = NAN
    return new.requires_grad_(True), old, ref


def _example_rewards():
    steps = [mig_inline(l) for l in L]
    assert [h for h, _, _ in steps] == [[-3, -2, -1.5, -1], [-3, -3, -3], [-3, -3, -2], [-3, -2]]
    assert [g for _, g, _ in steps] == [[1, 0.5, 0.5], [0, 0], [0, 1], [1]]
    r_proc = torch.tensor([r for _, _, r in steps])
    assert r_proc.tolist() == [2, 0, 1, 1]
    r_out = ACC + FMT
    assert r_out.tolist() == [2, 2, 1, 1]
    gains = torch.zeros(4, 3)
    step_mask = torch.zeros(4, 3, dtype=torch.bool)
    for i, (_, g, _) in enumerate(steps):
        gains[i, : len(g)] = torch.tensor(g)
        step_mask[i, : len(g)] = True
    return r_out, r_proc, gains, step_mask


def test_worked_example_trajectory_credit():
    r_out, r_proc, _gains, _step_mask = _example_rewards()
    adv = compute_advantages(r_out, r_proc, M_FULL, M_COT, 4)
    torch.testing.assert_close(adv.seq_out, torch.tensor([A, A, -A, -A]))
    torch.testing.assert_close(adv.seq_proc, torch.tensor([B, -B, 0.0, 0.0]))
    torch.testing.assert_close(
        adv.tok_out,
        torch.tensor(
            [
                [A, A, A, A, A, A, A, A],
                [A, A, A, A, A, A, A, 0],
                [-A, -A, -A, -A, -A, -A, 0, 0],
                [-A, -A, -A, -A, -A, 0, 0, 0],
            ]
        ),
    )
    torch.testing.assert_close(
        adv.tok_proc,
        torch.tensor(
            [
                [0, B, B, B, B, 0, 0, 0],
                [0, -B, -B, -B, 0, 0, 0, 0],
                [0.0] * 8,
                [0.0] * 8,
            ]
        ),
    )

    new, old, ref = _logps()
    loss, d = total_loss(
        new,
        LossInputs(
            M_FULL, M_COT, adv.tok_out, adv.tok_proc, old_logp=old, ref_logp=ref, acc=ACC, fmt=FMT, r_proc=r_proc
        ),
    )
    # PG_out (grpo): per-sequence means r1 min(1.5a, 1.2a) = 1.2a, r2 a, r3 min(-0.5a, -0.8a) = -0.8a, r4 -a
    pg_out = -(1.2 * A + A - 0.8 * A - A) / 4
    # PG_proc: r1's 4 CoT tokens 1.2b each, r2's 3 tokens -b each, r3/r4 advantage 0
    pg_proc = -(1.2 * B - B) / 4
    # k3 per token: r1 exp(-ln1.5) + ln1.5 - 1 = ln1.5 - 1/3; r3 exp(ln2) - ln2 - 1 = 1 - ln2; others 0
    kl = ((LN15 - 1 / 3) + (1 - LN2)) / 4
    # SFT gates (fmt = acc = 1): r1, r2 -> -mean(-1 + ln1.5, -1)
    sft = 1 - LN15 / 2
    expected = 1.0 * pg_proc + 1.0 * pg_out + 0.04 * kl + 0.1 * sft
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert d["pg_out"].item() == pytest.approx(pg_out, rel=1e-5)
    assert d["pg_proc"].item() == pytest.approx(pg_proc, rel=1e-5)
    assert d["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert d["sft"].item() == pytest.approx(sft, rel=1e-5)
    assert d["clip_frac_out"].item() == pytest.approx(14 / 26)  # r1's 8 tokens high, r3's 6 low
    assert d["clip_frac_proc"].item() == pytest.approx(4 / 11)  # r1's 4 CoT tokens (r3's have A = 0)
    assert d["ratio_max"].item() == pytest.approx(1.5) and d["ratio_min"].item() == pytest.approx(0.5)
    assert d["ratio_mean"].item() == pytest.approx(27 / 26)
    assert d["kl_mean"].item() == pytest.approx((8 * (LN15 - 1 / 3) + 6 * (1 - LN2)) / 26, rel=1e-5)
    assert d["sft_gate_rate"].item() == 0.5 and d["sft_gated"].item() == 2

    loss.backward()
    g = new.grad
    assert torch.isfinite(g).all() and (g[~M_FULL] == 0).all()  # NaN padding never leaks
    # r2's tokens (ratio 1, unclipped; k3 has zero slope where logp = ref):
    #   d/dlogp of  -(1/4)(1/7) r a  [outcome]  -(1/4)(1/3) r (-b)  [CoT tokens only]  -0.1 (1/2)(1/7) logp  [SFT]
    g_tag = -A / 28 - 0.1 / 14
    g_cot = g_tag + B / 12
    torch.testing.assert_close(g[1, :7], torch.tensor([g_tag, g_cot, g_cot, g_cot, g_tag, g_tag, g_tag]))

    # The third gate (R_proc > 0) drops r2, the lucky guess: SFT then imitates r1 only.
    _loss3, d3 = total_loss(
        new,
        LossInputs(
            M_FULL, M_COT, adv.tok_out, adv.tok_proc, old_logp=old, ref_logp=ref, acc=ACC, fmt=FMT, r_proc=r_proc
        ),
        LossConfig(sft_gate_proc=True),
    )
    assert d3["sft"].item() == pytest.approx(1 - LN15, rel=1e-5)
    assert d3["sft_gate_rate"].item() == 0.25


def test_worked_example_step_credit():
    r_out, r_proc, gains, step_mask = _example_rewards()
    # The group's 8 step gains 1, .5, .5 | 0, 0 | 0, 1 | 1: mean 0.5, deviations .5, 0, 0 | -.5, -.5 | -.5, .5 | .5,
    # sum of squares 6 * 0.25 = 1.5, unbiased var 1.5 / 7 -> c = 0.5 / (sqrt(3/14) + eps)
    adv = compute_advantages(
        r_out,
        r_proc,
        M_FULL,
        M_COT,
        4,
        AdvantageConfig(process_credit="step"),
        step_gains=gains,
        step_mask=step_mask,
        token_step=TOKEN_STEP,
    )
    torch.testing.assert_close(
        adv.tok_proc,
        torch.tensor(
            [
                [0, C, C, 0, 0, 0, 0, 0],
                [0, -C, -C, -C, 0, 0, 0, 0],
                [0, -C, -C, C, 0, 0, 0, 0],
                [0, C, 0, 0, 0, 0, 0, 0],
            ]
        ),
    )
    new, old, _ = _logps()
    pg, _ = pg_loss(new, old, adv.tok_proc, M_COT)
    # r1: (1.2c + 1.2c + 0 + 0) / 4; r2: -c; r3 (ratio .5): (-.8c - .8c + .5c) / 3; r4: c
    expected = -(2.4 * C / 4 - C - 1.1 * C / 3 + C) / 4
    assert pg.item() == pytest.approx(expected, rel=1e-5)


def test_normalizers_on_the_example():
    _, old, _ = _logps()
    new, _, _ = _logps()
    adv = torch.tensor([A, A, -A, -A])
    # token sums: r1 8 * 1.2a, r2 7a, r3 6 * -0.8a, r4 5 * -a  -> 6.8a over 26 tokens
    dapo, _ = pg_loss(new, old, adv, M_FULL, normalizer="dapo")
    assert dapo.item() == pytest.approx(-6.8 * A / 26, rel=1e-5)
    dr, _ = pg_loss(new, old, adv, M_FULL, normalizer="dr_grpo", max_completion_length=10)
    assert dr.item() == pytest.approx(-6.8 * A / 40, rel=1e-5)
    dr_t, _ = pg_loss(new, old, adv, M_FULL, normalizer="dr_grpo")  # L defaults to T = 8
    assert dr_t.item() == pytest.approx(-6.8 * A / 32, rel=1e-5)
    with pytest.raises(ValueError):
        LossConfig(normalizer="token")


def test_ratio_stats_ignore_padding():
    logp = torch.tensor([[0.4, 0.4, 9.0], [0.2, -9.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    _, d = total_loss(
        logp,
        LossInputs(mask, mask, torch.zeros(2), torch.zeros(2), old_logp=torch.zeros(2, 3)),
        LossConfig(gamma=0, kl_coef=0),
    )
    assert d["ratio_min"].item() == pytest.approx(math.exp(0.2)) and d["ratio_max"].item() == pytest.approx(
        math.exp(0.4)
    )
    empty = torch.zeros(2, 3, dtype=torch.bool)
    _, d = total_loss(
        logp,
        LossInputs(empty, empty, torch.zeros(2), torch.zeros(2), old_logp=torch.zeros(2, 3)),
        LossConfig(gamma=0, kl_coef=0),
    )
    assert d["ratio_min"].item() == 1.0 and d["ratio_max"].item() == 1.0 and d["clip_frac_out"].item() == 0


def test_clip_higher():
    new, old, _ = _logps()
    _, d = pg_loss(new, old, torch.tensor([A, A, -A, -A]), M_FULL, eps_clip_high=0.6)
    assert d["clip_frac_high"].item() == 0 and d["clip_frac_low"].item() == pytest.approx(6 / 26)


# ----------------------------------------------------------------------------------------------
# GRPO = the same code with alpha = gamma = 0
# ----------------------------------------------------------------------------------------------


def grpo_reference(logp, old, ref, rewards, mask, group, eps_clip=0.2, beta=0.04):
    """The GRPO objective written directly (as in the DeepSeekMath paper / TRL), independent of vlm_mig."""
    rg = rewards.view(-1, group)
    adv = (rewards - rg.mean(1).repeat_interleave(group)) / (rg.std(1).repeat_interleave(group) + 1e-4)
    ratio = torch.exp(logp - old)
    surr = torch.min(ratio * adv[:, None], torch.clamp(ratio, 1 - eps_clip, 1 + eps_clip) * adv[:, None])
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_tok = -(surr - beta * kl)
    return ((per_tok * mask).sum(-1) / mask.sum(-1)).mean()


def test_grpo_is_alpha_gamma_zero():
    gen = torch.Generator().manual_seed(0)
    b, t, group = 8, 12, 4
    old = -torch.rand(b, t, generator=gen) * 3
    ref = old + 0.3 * torch.randn(b, t, generator=gen)
    base = old + 0.3 * torch.randn(b, t, generator=gen)  # ratios around 1, some clipped
    lengths = torch.randint(3, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 0.5, 0.5, 2.0])
    m_cot = mask & (torch.rand(b, t, generator=gen) < 0.5)

    ref_logp = base.clone().requires_grad_(True)
    expected = grpo_reference(ref_logp, old, ref, rewards, mask.float(), group)
    expected.backward()

    ours_logp = base.clone().requires_grad_(True)
    adv = compute_advantages(rewards, torch.randn(b, generator=gen), mask, m_cot, group)
    loss, d = total_loss(
        ours_logp,
        LossInputs(
            mask,
            m_cot,
            adv.tok_out,
            adv.tok_proc,
            old_logp=old,
            ref_logp=ref,
            acc=(rewards > 1).float(),
            fmt=torch.ones(b),
        ),
        LossConfig(alpha=0.0, gamma=0.0),
    )
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(ours_logp.grad, ref_logp.grad, rtol=1e-5, atol=1e-7)
    assert d["clip_frac_out"] > 0  # the batch exercises the clip
    assert "pg_proc" not in d and "sft" not in d


def test_microbatches_sum_to_full_batch():
    gen = torch.Generator().manual_seed(1)
    b, t = 8, 10
    old = -torch.rand(b, t, generator=gen) * 3
    ref = old + 0.2 * torch.randn(b, t, generator=gen)
    base = old + 0.3 * torch.randn(b, t, generator=gen)
    mf = torch.arange(t)[None] < torch.randint(0, t + 1, (b,), generator=gen)[:, None]
    mc = mf & (torch.rand(b, t, generator=gen) < 0.6)
    a_out, a_proc = torch.randn(b, generator=gen), torch.randn(b, generator=gen)
    acc, fmt = (torch.rand(b, generator=gen) < 0.5).float(), (torch.rand(b, generator=gen) < 0.7).float()
    for norm in ("grpo", "dapo", "dr_grpo"):
        cfg = LossConfig(normalizer=norm, max_completion_length=16)
        full, _ = total_loss(base, LossInputs(mf, mc, a_out, a_proc, old_logp=old, ref_logp=ref, acc=acc, fmt=fmt), cfg)
        den = Denominators.from_batch(mc, mf, sft_gate(acc, fmt), cfg)
        parts = sum(
            total_loss(
                base[s],
                LossInputs(mf[s], mc[s], a_out[s], a_proc[s], old_logp=old[s], ref_logp=ref[s], acc=acc[s], fmt=fmt[s]),
                cfg,
                denominators=den,
            )[0]
            for s in (slice(0, 3), slice(3, 8))
        )
        assert parts.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6), norm


# ----------------------------------------------------------------------------------------------
# Edge cases and robustness
# ----------------------------------------------------------------------------------------------


def test_sft_no_gated_rollout_is_zero_with_graph():
    logp = torch.randn(3, 5, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    gate = sft_gate(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]))
    assert not gate.any()
    loss = sft_loss(logp, mask, gate)
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad is not None and (logp.grad == 0).all()
    # all weights zero still gives a loss attached to the graph
    total, d = total_loss(
        logp, LossInputs(mask, mask, torch.zeros(3), torch.zeros(3)), LossConfig(alpha=0, beta=0, gamma=0, kl_coef=0)
    )
    total.backward()
    assert total.item() == 0.0 and d["sft_gate_rate"].item() == 0


def test_single_gate_sft_ablations():
    acc = torch.tensor([1.0, 1.0, 0.0, 0.0])
    fmt = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert sft_gate(acc, fmt).tolist() == [True, False, False, False]
    assert sft_gate(acc, fmt, gates="format").tolist() == [True, False, True, False]
    assert sft_gate(acc, fmt, gates="accuracy").tolist() == [True, True, False, False]
    assert sft_gate(acc, fmt, torch.tensor([0.0, 1.0, 1.0, 1.0]), gate_proc=True, gates="accuracy").tolist() == [
        False,
        True,
        False,
        False,
    ]
    # In the total loss the SFT term imitates exactly the gated rows.
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-4.0, -4.0], [-8.0, -8.0]])
    m = torch.ones(4, 2, dtype=torch.bool)
    for gates, want in (("both", 1.0), ("format", 2.5), ("accuracy", 1.5)):
        cfg = LossConfig(alpha=0, beta=0, kl_coef=0, gamma=1.0, sft_gates=gates)
        _, d = total_loss(logp, LossInputs(m, m, torch.zeros(4), torch.zeros(4), acc=acc, fmt=fmt), cfg)
        assert d["sft"].item() == pytest.approx(want), gates
    with pytest.raises(ValueError, match="sft_gates"):
        LossConfig(sft_gates="structural")


def test_k3_kl_properties():
    p = torch.tensor([[-1.0, -2.0, -0.5]])
    q = torch.tensor([[-1.0, -1.0, -3.0]])
    kl = k3_kl(p, q, torch.ones_like(p, dtype=torch.bool))
    assert kl[0, 0] == 0 and (kl >= 0).all()
    assert kl[0, 1].item() == pytest.approx(math.exp(1) - 1 - 1)  # q - p = 1


def test_missing_inputs_are_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logp"):
        total_loss(x, LossInputs(m, m, torch.zeros(2), torch.zeros(2), old_logp=x), LossConfig(gamma=0))
    with pytest.raises(ValueError, match="acc and fmt to compute it"):
        total_loss(x, LossInputs(m, m, torch.zeros(2), torch.zeros(2), old_logp=x), LossConfig(kl_coef=0))
    with pytest.raises(ValueError):
        sft_gate(torch.ones(2), torch.ones(2), gate_proc=True)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
special = st.sampled_from([0.0, -1e4, 1e4, -30.0, 30.0])
cells = st.one_of(finite, special)


@st.composite
def _loss_batch(draw):
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 6))

    def mat(el):
        return torch.tensor(draw(st.lists(st.lists(el, min_size=t, max_size=t), min_size=b, max_size=b)))

    def vec(el):
        return torch.tensor(draw(st.lists(el, min_size=b, max_size=b)))

    mf = mat(st.booleans())
    mc = mf & mat(st.booleans())
    return {
        "logp": mat(cells),
        "old": mat(cells),
        "ref": mat(cells),
        "mf": mf,
        "mc": mc,
        "a_out": mat(cells),
        "a_proc": vec(cells),
        "acc": vec(st.sampled_from([0.0, 1.0])),
        "fmt": vec(st.sampled_from([0.0, 1.0])),
        "r_proc": vec(cells),
        "entropy": mat(cells),
    }


VARIANTS = [
    {},
    {"mask_truncated": True},
    {"importance_sampling": "sequence"},
    {"type": "cispo", "cispo_eps_low": 0.5},
    {"type": "cispo", "importance_sampling": "sequence", "top_entropy_quantile": 0.3, "mask_truncated": True},
    {"top_entropy_quantile": 0.2},
]


@settings(max_examples=150, deadline=None)
@given(
    _loss_batch(), st.sampled_from(["grpo", "dapo", "dr_grpo"]), st.booleans(), st.booleans(), st.sampled_from(VARIANTS)
)
def test_total_loss_always_finite(x, norm, gate_proc, garbage_padding, variant):
    logp, old, ref = x["logp"], x["old"], x["ref"]
    if garbage_padding:  # NaN/inf where the mask is off must not matter
        logp = torch.where(x["mf"], logp, NAN)
        old = torch.where(x["mf"], old, -math.inf)
        ref = torch.where(x["mf"], ref, math.inf)
    logp = logp.clone().requires_grad_(True)
    cfg = LossConfig(normalizer=norm, sft_gate_proc=gate_proc, eps_clip_high=0.28, **variant)
    loss, d = total_loss(
        logp,
        LossInputs(
            x["mf"],
            x["mc"],
            x["a_out"],
            x["a_proc"],
            old_logp=old,
            ref_logp=ref,
            acc=x["acc"],
            fmt=x["fmt"],
            r_proc=x["r_proc"],
            truncated=x["acc"] == 0,
        ),
        cfg,
        entropy=x["entropy"],
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()
    for k, v in d.items():
        assert torch.isfinite(v).all(), k


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=4, max_size=4))
def test_group_normalize_feeds_finite_loss(rewards):
    # From rewards to loss: any rewards of a group give a finite loss and gradient.
    r = torch.tensor(rewards)
    adv = group_normalize(r, 4)
    logp = torch.zeros(4, 3, requires_grad=True)
    loss, _ = pg_loss(logp, torch.zeros(4, 3), adv, torch.ones(4, 3, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


# ----------------------------------------------------------------------------------------------
# Loss variants (SPEC section 5.1), each against numbers worked out by hand
# ----------------------------------------------------------------------------------------------


def test_variants_default_off_and_bounds():
    cfg = LossConfig()
    assert (cfg.mask_truncated, cfg.importance_sampling, cfg.type) == (False, "token", "ppo")
    assert (cfg.cispo_eps_high, cfg.cispo_eps_low, cfg.top_entropy_quantile) == (4.0, None, 1.0)
    for bad in (
        {"importance_sampling": "seq"},
        {"type": "gspo"},
        {"top_entropy_quantile": 0.0},
        {"top_entropy_quantile": 1.5},
        {"cispo_eps_high": -1.0},
        {"cispo_eps_low": 2.0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossConfig(**bad)


def _eos_rollouts(ids: list[list[int]], eos: tuple[int, ...]) -> Rollouts:
    t = torch.tensor(ids)
    n = t.shape[0]
    return Rollouts(
        samples=[],
        prompts=None,
        group=torch.zeros(n, dtype=torch.long),
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=t,
        completion_mask=completion_mask(t, list(eos)),
        texts=[""] * n,
        eos_ids=eos,
    )


def test_rollouts_truncated_flags():
    # EOS ids 2 and 9 (pad 0): r0 stops early, r1 stops on its very last token (full width, not truncated), r2 never
    # stops (truncated), r3 stops at once on the other EOS id.
    r = _eos_rollouts([[5, 6, 2, 0], [5, 6, 7, 2], [5, 6, 7, 8], [9, 0, 0, 0]], (2, 9))
    assert r.truncated.tolist() == [False, False, True, False]
    assert _eos_rollouts([[5, 6, 7, 8]], ()).truncated.tolist() == [False]  # stop tokens unknown: given completions

    class Tok:  # what assemble_rollouts needs of a processor
        def batch_decode(self, rows, skip_special_tokens):
            return ["x"] * len(rows)

    from vlm_mig.processing import PromptBatch

    prompts = PromptBatch(
        input_ids=torch.ones(1, 2, dtype=torch.long),
        attention_mask=torch.ones(1, 2, dtype=torch.long),
        sample_ids=["a"],
        texts=["p"],
    )
    got = assemble_rollouts(Tok(), [None], prompts, torch.tensor([[5, 2, 7], [5, 6, 7]]), [2], 0)
    assert got.eos_ids == (2,) and got.truncated.tolist() == [False, True]

    # RLBatch.loss_inputs carries the flags of the rows asked for
    batch = RLBatch(rollouts=_eos_rollouts([[5, 2, 0], [5, 6, 7], [5, 6, 2]], (2,)))
    batch.m_full = batch.m_proc = batch.rollouts.completion_mask.bool()
    x = batch.loss_inputs([2, 1], torch.device("cpu"), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3).bool())
    assert x.truncated.tolist() == [False, True]


def test_mask_truncated_by_hand():
    # r0: 3 tokens, A = +1, not truncated; r1: 2 tokens, A = -1, truncated. ratio 1 everywhere (old = new), so each
    # token's PPO term is -A; k3 is 0 on r0 (ref = old) and e - 2 on r1's tokens (ref - logp = 1).
    mf = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    adv = torch.tensor([1.0, -1.0])
    trunc = torch.tensor([False, True])
    old = torch.full((2, 3), -1.0)
    ref = old.clone()
    ref[1] += 1.0

    def run(norm, mask_truncated, **kw):
        logp = old.clone().requires_grad_(True)
        cfg = LossConfig(alpha=0, gamma=0, kl_coef=0.5, normalizer=norm, mask_truncated=mask_truncated)
        loss, d = total_loss(logp, LossInputs(mf, mf, adv, adv, old_logp=old, ref_logp=ref, truncated=trunc), cfg, **kw)
        loss.backward()
        return loss.item(), d, logp.grad

    k3 = math.e - 2
    # Off: dapo D = 5 tokens; PG = -(3 - 2) / 5, KL = 2 k3 / 5
    loss, d, _ = run("dapo", False)
    assert loss == pytest.approx(-0.2 + 0.5 * 2 * k3 / 5)
    assert d["truncated_frac"].item() == 0.5  # logged whenever the flags are given
    # On: r1 leaves PG and KL, and (as TRL counts num_items_in_batch after masking) dapo's D = 3
    loss, d, grad = run("dapo", True)
    assert loss == pytest.approx(-1.0) and d["kl"].item() == 0.0
    assert grad[1].abs().sum().item() == 0.0 and grad[0].tolist() == pytest.approx([-1 / 3] * 3)
    # grpo: r1 still counts in B = 2 (TRL's mean over sequences): -(1) / 2
    assert run("grpo", True)[0] == pytest.approx(-0.5)
    # The stage's full-batch denominators take the flags too; without them dapo's D keeps r1's 2 tokens
    cfg = LossConfig(normalizer="dapo", mask_truncated=True)
    assert Denominators.from_batch(mf, mf, torch.zeros(2).bool(), cfg, truncated=trunc).full == 3.0
    assert Denominators.from_batch(mf, mf, torch.zeros(2).bool(), cfg).full == 5.0
    assert run("dapo", True, denominators=Denominators(cot=5.0, full=5.0, sft=1.0))[0] == pytest.approx(-3 / 5)
    with pytest.raises(ValueError, match="truncated"):
        total_loss(old, LossInputs(mf, mf, adv, adv), LossConfig(gamma=0, mask_truncated=True))


def test_gspo_sequence_ratio_by_hand():
    # B = 2 rows, 2 tokens each, grpo normaliser, A = +1 per row, eps 0.2.
    # r0: log ratios [ln 4, 0] -> s = exp(ln 4 / 2) = 2 -> clipped to 1.2: loss -1.2 per token, no gradient.
    # r1: log ratios [2 ln 1.1, 0] -> s = 1.1, inside the clip: loss -1.1 per token; d loss / d logp_t =
    #     -(1/B) (1/|M|) s = -1.1 / 4 on each token (with "token" ratios it would be -(1/4) [1.21, 1]).
    old = torch.zeros(2, 2)
    m = torch.ones(2, 2, dtype=torch.bool)
    new = torch.tensor([[math.log(4.0), 0.0], [2 * math.log(1.1), 0.0]], requires_grad=True)
    loss, d = pg_loss(new, old, torch.tensor([1.0, 1.0]), m, importance_sampling="sequence")
    loss.backward()
    assert loss.item() == pytest.approx(-(1.2 + 1.1) / 2)
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.0], [-0.275, -0.275]]))
    assert d["seq_ratio_mean"].item() == pytest.approx((2 + 1.1) / 2)
    assert d["clip_frac"].item() == 0.5 and d["clip_frac_high"].item() == 0.5  # r0's two tokens of four

    # Per-token advantages [+1, -1] on r1: each token keeps its own (GSPO-token): -(1/4) s [1, -1]
    new.grad = None
    pg_loss(new, old, torch.tensor([[1.0, 1.0], [1.0, -1.0]]), m, importance_sampling="sequence")[0].backward()
    torch.testing.assert_close(new.grad[1], torch.tensor([-0.275, 0.275]))


def test_gspo_matches_trl_for_row_advantages():
    # TRL: log_w = (log_ratio * mask).sum(-1) / mask.sum(-1); coef_1 = exp(log_w)[:, None]; same loss and gradient
    gen = torch.Generator().manual_seed(3)
    b, t = 6, 7
    old = -torch.rand(b, t, generator=gen) * 2
    base = old + 0.3 * torch.randn(b, t, generator=gen)
    m = torch.arange(t)[None] < torch.randint(1, t + 1, (b,), generator=gen)[:, None]
    adv = torch.randn(b, generator=gen)
    for norm in ("grpo", "dapo"):
        ours = base.clone().requires_grad_(True)
        loss, _ = pg_loss(ours, old, adv, m, importance_sampling="sequence", normalizer=norm, eps_clip=0.1)
        loss.backward()
        theirs = base.clone().requires_grad_(True)
        log_ratio = torch.where(m, theirs - old, 0.0)
        coef_1 = torch.exp(log_ratio.sum(-1) / m.sum(-1)).unsqueeze(-1)
        per_tok = -torch.min(coef_1 * adv[:, None], coef_1.clamp(0.9, 1.1) * adv[:, None]) * m
        ref = (per_tok.sum(-1) / m.sum(-1)).mean() if norm == "grpo" else per_tok.sum() / m.sum()
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_gspo_each_term_over_its_own_mask():
    # One row, log ratios [ln 2, ln 2, ln 8] over M_full, M_cot = the first two tokens:
    # the process term's s = 2 (reasoning tokens only), the outcome term's s = exp(5 ln 2 / 3) = 2^(5/3)
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(2.0), math.log(2.0), math.log(8.0)]])
    mf = torch.ones(1, 3, dtype=torch.bool)
    mc = torch.tensor([[True, True, False]])
    cfg = LossConfig(gamma=0, kl_coef=0, importance_sampling="sequence")
    _, d = total_loss(new, LossInputs(mf, mc, torch.ones(1), torch.ones(1), old_logp=old), cfg)
    assert d["seq_ratio_mean_proc"].item() == pytest.approx(2.0)
    assert d["seq_ratio_mean_out"].item() == pytest.approx(2 ** (5 / 3))
    assert d["ratio_max"].item() == pytest.approx(8.0)  # the token ratios are still what ratio_* report


def test_cispo_by_hand():
    # One row, 3 tokens, A = +1, token ratios [2, 0.5, 1], logp = [-1 + ln 2, -1 - ln 2, -1]; grpo (1/3 each, B = 1).
    # cispo_eps_high 0.5 -> cap 1.5, no floor: weights [1.5, 0.5, 1] (detached), loss = -(1/3) sum w * logp,
    # gradient -(1/3) w: the ratio-2 token still learns (PPO would give it none).
    old = torch.full((1, 3), -1.0)
    new = (old + torch.tensor([[math.log(2.0), math.log(0.5), 0.0]])).requires_grad_(True)
    m = torch.ones(1, 3, dtype=torch.bool)
    loss, d = pg_loss(new, old, torch.ones(1), m, loss_type="cispo", cispo_eps_high=0.5)
    loss.backward()
    logp = [-1 + LN2, -1 - LN2, -1.0]
    assert loss.item() == pytest.approx(-(1.5 * logp[0] + 0.5 * logp[1] + logp[2]) / 3)
    torch.testing.assert_close(new.grad, torch.tensor([[-0.5, -1 / 6, -1 / 3]]))
    assert d["clip_frac_high"].item() == pytest.approx(1 / 3) and d["clip_frac_low"].item() == 0.0
    # a floor 1 - 0.2: weights [1.5, 0.8, 1]; a negative advantage flips the gradient, the weights stay
    new.grad = None
    loss, d = pg_loss(new, old, -torch.ones(1), m, loss_type="cispo", cispo_eps_high=0.5, cispo_eps_low=0.2)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.5, 0.8 / 3, 1 / 3]]))
    assert d["clip_frac"].item() == pytest.approx(2 / 3) and d["clip_frac_low"].item() == pytest.approx(1 / 3)
    # via the config, with GSPO: r = s = exp(mean log r) = 1 for all three tokens (ln 2 - ln 2 + 0), weight 1
    new.grad = None
    cfg = LossConfig(alpha=0, gamma=0, kl_coef=0, type="cispo", importance_sampling="sequence")
    total_loss(new, LossInputs(m, m, torch.ones(1), torch.ones(1), old_logp=old), cfg)[0].backward()
    torch.testing.assert_close(new.grad, torch.full((1, 3), -1 / 3))


def test_top_entropy_quantile_by_hand():
    # Masked entropies: r0 [0.1, 0.5, 0.9], r1 [0.05, 0.1, 0.15, 0.2]. q = 0.25 keeps entropy >= the 0.75 quantile of
    # all 7 (TRL: one threshold over the batch): sorted [.05 .1 .1 .15 .2 .5 .9], position 6 * 0.75 = 4.5 -> 0.35.
    # Kept: r0's 0.5 and 0.9, nothing of r1 (a per-sequence quantile would keep r1's 0.2).
    P_ = float("nan")
    ent = torch.tensor([[0.1, 0.5, 0.9, P_], [0.05, 0.1, 0.15, 0.2]])
    mf = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    mc = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    keep = high_entropy_mask(ent, mf, 0.25)
    assert keep.tolist() == [[False, True, True, False], [False] * 4]
    # Loss (grpo, ratio 1, A = [+1, -1], outcome term only): r0 -(1 + 1) / 3, r1 0; B = 2 -> -1/3.
    old = torch.full((2, 4), -1.0)
    logp = old.clone().requires_grad_(True)
    cfg = LossConfig(gamma=0, kl_coef=0, top_entropy_quantile=0.25)
    adv = torch.tensor([1.0, -1.0])
    loss, d = total_loss(logp, LossInputs(mf, mc, adv, torch.zeros(2), old_logp=old), cfg, entropy=ent)
    loss.backward()
    assert d["pg_out"].item() == pytest.approx(-1 / 3)
    torch.testing.assert_close(logp.grad, torch.tensor([[0, -1 / 6, -1 / 6, 0], [0.0] * 4]))
    # the selection is over M_full, then intersected with M_cot: of M_cot's 5 tokens only r0's 0.5 is kept
    assert d["entropy_kept_frac_out"].item() == pytest.approx(2 / 7)
    assert d["entropy_kept_frac_proc"].item() == pytest.approx(1 / 5)
    # With mask_truncated, r1 (truncated) is not among the candidates: r0 alone, 0.75 quantile of [.1 .5 .9] = 0.7
    cfg = LossConfig(gamma=0, kl_coef=0, top_entropy_quantile=0.25, mask_truncated=True)
    _, d = total_loss(
        logp, LossInputs(mf, mc, adv, adv, old_logp=old, truncated=torch.tensor([False, True])), cfg, entropy=ent
    )
    assert d["entropy_kept_frac_out"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="entropy"):
        total_loss(logp, LossInputs(mf, mc, adv, adv, old_logp=old), LossConfig(gamma=0, top_entropy_quantile=0.5))


def test_rollout_correction_weights_and_mismatch_by_hand():
    from vlm_mig.losses import rollout_correction

    old = torch.tensor([[-1.0, -2.0, -1.0, -7.0]])
    sampler = torch.tensor([[-1.5, -0.5, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])  # d = 0.5, -1.5, 0 on the mask
    e = math.exp
    none, diag = rollout_correction(old, sampler, mask, "none", 1.5)
    assert none is None
    assert diag["rollout_logp_diff"].item() == pytest.approx(2.0 / 3)
    assert diag["rollout_kl"].item() == pytest.approx(((e(0.5) - 1.5) + (e(-1.5) + 0.5)) / 3)
    w, d = rollout_correction(old, sampler, mask, "token_truncate", 1.5)
    assert w.tolist()[0] == pytest.approx([1.5, e(-1.5), 1.0, 0.0]) and d[
        "rollout_capped_frac"
    ].item() == pytest.approx(1 / 3)
    w, _ = rollout_correction(old, sampler, mask, "token_mask", 1.5)
    assert w.tolist()[0] == pytest.approx([0.0, e(-1.5), 1.0, 0.0])
    w, d = rollout_correction(old, sampler, mask, "sequence_truncate", 1.5)  # one weight per row: exp(-1)
    assert w.tolist()[0] == pytest.approx([e(-1.0)] * 3 + [0.0]) and d["rollout_capped_frac"].item() == 0.0
    w, d = rollout_correction(-old, sampler, mask, "sequence_mask", 1.5)  # exp(4 + 2 + 1): over the cap, dropped
    assert w.abs().sum().item() == 0.0 and d["rollout_capped_frac"].item() == 1.0


def test_rollout_correction_weighs_the_policy_gradient_only():
    logp = torch.tensor([[-1.0, -2.0, -1.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -0.5, -1.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    ref = torch.tensor([[-1.2, -2.0, -0.9]])
    cfg = LossConfig(alpha=0, gamma=0, kl_coef=0.5, rollout_correction="token_truncate", rollout_correction_cap=1.5)
    inputs = LossInputs(m, m, torch.ones(1), torch.zeros(1), ref_logp=ref, sampler_logp=sampler)
    loss, d = total_loss(logp, inputs, cfg)
    plain, _ = total_loss(
        logp,
        LossInputs(m, m, torch.ones(1), torch.zeros(1), ref_logp=ref),
        dataclasses.replace(cfg, rollout_correction="none"),
    )
    # ratio 1 (num_iterations 1): PG = -mean(w * A) = -(1.5 + e^-1.5 + 1) / 3; KL is not weighted
    assert (loss - plain).item() == pytest.approx(-(1.5 + math.exp(-1.5) + 1) / 3 + 1.0)
    assert d["rollout_capped_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    with pytest.raises(ValueError, match="sampler's log-probs"):
        total_loss(logp, LossInputs(m, m, torch.ones(1), torch.zeros(1), ref_logp=ref), cfg)
    with pytest.raises(ValueError, match="rollout_correction"):
        LossConfig(rollout_correction="token")

"""Group normalisation and decoupled token advantages (SPEC section 4)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_mig.advantages import (
    AdvantageConfig,
    compute_advantages,
    group_normalize,
    process_token_mask,
    step_normalize,
    token_advantages,
    zero_std_fraction,
)

EPS = 1e-4


def test_group_normalize_by_hand():
    # group 1: R = [2, 2, 1, 1]: mean 1.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3
    # group 2: R = [0, 0, 0, 0]: constant -> exactly 0
    r = torch.tensor([2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    a = group_normalize(r, 4)
    s = 0.5 / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(a, torch.tensor([s, s, -s, -s, 0, 0, 0, 0]))
    assert (a[4:] == 0).all()
    # none: only the group mean is removed
    torch.testing.assert_close(
        group_normalize(r, 4, scale="none"), torch.tensor([0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0])
    )
    # batch: group means kept, std of all 8 rewards: mean 0.75, sum sq dev = 2*1.5625 + 2*0.0625 + 4*0.5625 = 5.5
    sb = math.sqrt(5.5 / 7)
    torch.testing.assert_close(
        group_normalize(r, 4, scale="batch"), torch.tensor([0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0]) / (sb + EPS)
    )


def test_constant_group_exact_zero_even_when_mean_rounds():
    # 0.1 * 3 / 3 != 0.1 in floating point: the mean of equal values need not equal them.
    r = torch.tensor([0.1, 0.1, 0.1, 1e30, 1e30, 1e30])
    for scale in ("group", "batch", "none"):
        a = group_normalize(r, 3, scale=scale)
        assert (a == 0).all(), (scale, a)
    assert zero_std_fraction(r, 3) == 1.0
    # groups of one rollout have no spread: 0, not NaN (unbiased std of one value is NaN)
    assert (group_normalize(torch.tensor([1.0, 5.0]), 1) == 0).all()


def test_group_size_must_divide():
    with pytest.raises(ValueError):
        group_normalize(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        AdvantageConfig(scale="rank")
    with pytest.raises(ValueError):
        AdvantageConfig(process_credit="token")


def test_step_normalize_by_hand():
    # One group of 2 rollouts: gains [1, 0, pad] and [0.5, 0.5, 0.5] -> 5 valid steps, mean 0.5,
    # deviations [0.5, -0.5, 0, 0, 0], unbiased var = 0.5 / 4 = 0.125
    g = torch.tensor([[1.0, 0.0, 9.0], [0.5, 0.5, 0.5]])
    m = torch.tensor([[True, True, False], [True, True, True]])
    a = step_normalize(g, m, 2)
    s = 0.5 / (math.sqrt(0.125) + EPS)
    torch.testing.assert_close(a, torch.tensor([[s, -s, 0.0], [0.0, 0.0, 0.0]]))


def test_token_advantages_trajectory_and_step():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    seq = torch.tensor([2.0, -1.0])
    torch.testing.assert_close(token_advantages(seq, mask), torch.tensor([[2.0, 2, 2, 0], [0, -1, -1, -1]]))
    step_adv = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    token_step = torch.tensor([[0, 1, 1, -1], [-1, 0, -1, 1]])
    out = token_advantages(None, mask, step_adv=step_adv, token_step=token_step)
    torch.testing.assert_close(out, torch.tensor([[10.0, 20, 20, 0], [0, 30, 0, 40]]))
    with pytest.raises(ValueError):
        token_advantages(None, mask, step_adv=step_adv, token_step=torch.tensor([[2, 0, 0, 0], [0, 0, 0, 0]]))


def test_compute_advantages_decoupled_masks():
    r_out = torch.tensor([1.0, 0.0, 1.0, 1.0])  # group of 2: [1, 0] and [1, 1] (constant)
    r_proc = torch.tensor([0.0, 0.0, 0.3, 0.1])
    m_full = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    m_cot = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv = compute_advantages(r_out, r_proc, m_full, m_cot, 2)
    a = 0.5 / (math.sqrt(0.5) + EPS)  # two values 1 and 0: deviations +-0.5, unbiased var 0.5
    b = 0.1 / (math.sqrt(0.02) + EPS)  # 0.3 and 0.1: deviations +-0.1, unbiased var 0.02
    torch.testing.assert_close(adv.seq_out, torch.tensor([a, -a, 0, 0]))
    torch.testing.assert_close(adv.seq_proc, torch.tensor([0, 0, b, -b]))
    torch.testing.assert_close(adv.tok_out, torch.tensor([a, -a, 0, 0]).unsqueeze(-1) * m_full)
    torch.testing.assert_close(adv.tok_proc, torch.tensor([0, 0, b, -b]).unsqueeze(-1) * m_cot)
    assert adv.zero_std_out == 0.5 and adv.zero_std_proc == 0.5
    with pytest.raises(ValueError):
        compute_advantages(r_out, r_proc, m_full, m_cot, 2, AdvantageConfig(process_credit="step"))


def test_noise_floor_zeroes_groups_whose_process_rewards_barely_differ():
    # Group 1 spreads over 0.0009 nats: normalised it gets +-0.61 (eps = 1e-4 barely damps it; any group of
    # two distinct values gets +-0.707 without eps); under a floor of 0.05 it gets 0. Group 2 spreads over
    # 0.6 and keeps its advantages.
    r = torch.tensor([-1.0, -1.0009, 0.0, 0.6])
    plain = group_normalize(r, 2)
    floored = group_normalize(r, 2, min_spread=0.05)
    assert plain[0] > 0.6 and floored[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(floored[2:], plain[2:])
    assert zero_std_fraction(r, 2) == 0.0 and zero_std_fraction(r, 2, min_spread=0.05) == 0.5
    m = torch.ones(4, 3, dtype=torch.bool)
    adv = compute_advantages(torch.zeros(4), r, m, m, 2, min_spread=0.05)
    assert adv.seq_proc[:2].tolist() == [0.0, 0.0] and adv.below_min_spread == 0.5 and adv.zero_std_proc == 0.0
    # Step credit: the floor applies to the spread of the group's step gains.
    gains = torch.tensor([[0.01, 0.0], [0.02, 0.0], [1.0, 0.0], [0.0, 0.5]])
    smask = torch.ones(4, 2, dtype=torch.bool)
    st_adv = step_normalize(gains, smask, 2, min_spread=0.05)
    assert (st_adv[:2] == 0).all() and (st_adv[2:] != 0).any()
    torch.testing.assert_close(st_adv[2:], step_normalize(gains, smask, 2)[2:])


def test_the_default_noise_floor_zeroes_noise_sized_groups():
    """A group whose R_proc spreads over 0.02 nats (as measured on real groups) must not get advantages of order
    one under the defaults: mig.min_spread is on (0.1 nats), and a group with a real spread keeps its own."""
    from vlm_mig.config import load_config

    floor = load_config().mig.min_spread
    noise = torch.tensor([1.30, 1.31, 1.30, 1.32, 1.30, 1.31, 1.30, 1.32])
    assert group_normalize(noise, 8).abs().max() > 0.8  # without a floor: the issue's -0.84 ... +1.39
    assert floor > 0 and group_normalize(noise, 8, min_spread=floor).tolist() == [0.0] * 8
    real = torch.tensor([1.3, 2.9, 1.3, 0.2, 1.3, 1.3, 2.0, 1.3])
    torch.testing.assert_close(group_normalize(real, 8, min_spread=floor), group_normalize(real, 8))


def test_process_scale_matches_the_outcome_advantage_and_share_of_equal_outcome_groups():
    from vlm_mig.advantages import equal_outcome_share, scale_sums, scale_to_match

    tok_out = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    m_full = torch.tensor([[True, True, False], [True, True, False]])
    tok_proc = torch.tensor([[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0]])
    m_cot = torch.tensor([[True, False, False], [True, False, False]])
    out_sums, proc_sums = scale_sums(tok_out, m_full), scale_sums(tok_proc, m_cot)
    assert out_sums == (4.0, 4.0) and proc_sums == (18.0, 2.0)
    assert scale_to_match(out_sums, proc_sums) == pytest.approx(1 / 3)  # rms 1 against rms 3
    assert scale_to_match((0.0, 4.0), proc_sums) == 1.0  # nothing to match
    # Two groups of 2: group 0's outcomes are equal, group 1's differ; |A_proc| mass 3 + 3 against 1 + 1.
    r_out = torch.tensor([2.0, 2.0, 1.0, 2.0])
    tp = torch.tensor([[3.0], [-3.0], [1.0], [-1.0]])
    assert equal_outcome_share(r_out, tp, 2) == pytest.approx(0.75)
    assert torch.isnan(torch.tensor(equal_outcome_share(r_out, torch.zeros(4, 1), 2)))


def test_undecoupled_ablation_puts_the_process_advantage_on_every_completion_token():
    r_out = torch.tensor([1.0, 0.0])
    r_proc = torch.tensor([0.3, 0.1])
    m_full = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    m_cot = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    cot = compute_advantages(r_out, r_proc, m_full, m_cot, 2)
    full = compute_advantages(r_out, r_proc, m_full, m_cot, 2, AdvantageConfig(process_mask="full"))
    torch.testing.assert_close(full.tok_proc, full.seq_proc.unsqueeze(-1) * m_full)
    torch.testing.assert_close(cot.tok_proc, cot.seq_proc.unsqueeze(-1) * m_cot)
    torch.testing.assert_close(full.tok_out, cot.tok_out)
    assert process_token_mask(m_full, m_cot, "full") is m_full and process_token_mask(m_full, m_cot) is m_cot
    with pytest.raises(ValueError, match="process_mask"):
        AdvantageConfig(process_mask="all")
    with pytest.raises(ValueError, match="trajectory"):
        AdvantageConfig(process_mask="full", process_credit="step")


@st.composite
def _batch(draw):
    g = draw(st.integers(1, 4))
    n = draw(st.integers(1, 3))
    b, t, k = g * n, draw(st.integers(1, 6)), draw(st.integers(0, 4))
    fl = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    # few distinct values, so constant groups and ties happen often
    fl = st.one_of(fl, st.sampled_from([0.0, 1.0, 0.1, -2.5]))
    r_out = torch.tensor(draw(st.lists(fl, min_size=b, max_size=b)))
    r_proc = torch.tensor(draw(st.lists(fl, min_size=b, max_size=b)))
    gains = torch.tensor(
        draw(st.lists(st.lists(fl, min_size=k, max_size=k), min_size=b, max_size=b))
    ).reshape(b, k)
    k_i = draw(st.lists(st.integers(0, k), min_size=b, max_size=b))
    step_mask = torch.arange(k).unsqueeze(0) < torch.tensor(k_i).unsqueeze(-1)
    m_full = torch.tensor(
        draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b))
    )
    token_step = torch.tensor(
        draw(
            st.lists(
                st.lists(st.integers(-1, max(k - 1, -1)), min_size=t, max_size=t), min_size=b, max_size=b
            )
        )
    ).reshape(b, t)
    token_step = torch.where(token_step < torch.tensor(k_i).unsqueeze(-1), token_step, -1)
    m_cot = m_full & (token_step >= 0)
    return g, r_out, r_proc, gains, step_mask, m_full, m_cot, token_step


@settings(max_examples=150, deadline=None)
@given(_batch(), st.sampled_from(["group", "batch", "none"]), st.sampled_from(["trajectory", "step"]))
def test_advantages_always_finite(batch, scale, credit):
    g, r_out, r_proc, gains, step_mask, m_full, m_cot, token_step = batch
    adv = compute_advantages(
        r_out,
        r_proc,
        m_full,
        m_cot,
        g,
        AdvantageConfig(scale=scale, process_credit=credit),
        step_gains=gains,
        step_mask=step_mask,
        token_step=token_step,
    )
    for x in (adv.seq_out, adv.seq_proc, adv.tok_out, adv.tok_proc):
        assert torch.isfinite(x).all()
    assert (adv.tok_out[~m_full] == 0).all() and (adv.tok_proc[~m_cot] == 0).all()
    # each group's advantages sum to ~0 (a baseline, not a bias)
    sums = adv.seq_out.reshape(-1, g).sum(-1)
    assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-3 * max(1.0, float(adv.seq_out.abs().max())))


def test_within_group_credit_compares_rollouts_of_one_group_only() -> None:
    from vlm_mig.advantages import within_group_credit

    correct = torch.tensor([1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0])
    # g0: right 2.5 > wrong 0.5; g1: all right (not mixed); g2: right 0 < wrong 1; g3: a tie
    r_proc = torch.tensor([2.0, 1, 3, 0, 5, 5, 5, 5, 1, 0, 1, 1, 1, 1, 1, 1])
    a_out = torch.tensor([1.0, -1, 1, -1, 0, 0, 0, 0, -1, 3, -1, -1, 3, -1, -1, -1])
    a_proc = torch.tensor([1.0, 0, 2, -1, 1, -1, 1, -1, 1, -3, 1, 1, 0, 0, 0, 0])
    got = within_group_credit(correct, r_proc, a_out, a_proc, 4)
    assert got["mixed_groups"] == 3
    assert got["correct_higher"] == pytest.approx(1 / 3) and got["correct_lower"] == pytest.approx(1 / 3)
    # g0: centred A_out (1,-1,1,-1), A_proc (.5,-.5,1.5,-1.5): 4 / (2 * sqrt 5); g2: exactly -1; g1, g3 constant
    assert got["corr_groups"] == 2
    assert got["corr"] == pytest.approx((4 / (2 * 5**0.5) - 1) / 2, abs=1e-6)
    # Pooled across groups, right answers would look far better (mean R_proc 3.25 vs 0.875), because of the
    # all-right group g1; within groups it is one group each way.
    assert r_proc[correct == 1].mean() == 3.25 and r_proc[correct == 0].mean() == 0.875
    none = within_group_credit(torch.ones(4), torch.ones(4), torch.zeros(4), torch.zeros(4), 4)
    assert none["mixed_groups"] == 0 and math.isnan(none["correct_higher"]) and math.isnan(none["corr"])

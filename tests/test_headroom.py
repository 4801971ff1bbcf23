"""The headroom measurements before RL, on hand-made inputs: pass@k, majority@k, the blind sampler, fixable
greedy errors, error kinds read against a scene, and the gradient signal-to-noise."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_mig.data.clevr import equations, error_kind
from vlm_mig.evaluation.headroom import (
    answer_shares,
    blind_pass_at_k,
    headroom,
    k_values,
    majority_at_k,
    majority_vote,
)
from vlm_mig.rl.signal import cosine, signal_to_noise


def test_majority_vote_and_blocks():
    assert majority_vote(["3", "3", "2", None], "3") == 1.0
    assert majority_vote(["3", "2"], "3") == 0.5  # a tie: the share of tied answers that are right
    assert majority_vote([None, None], "3") == 0.0
    # K = 4, k = 2: blocks [3, 2] (tie: 1/2) and [3, 3] (1) -> 0.75; k = 4: 3 wins -> 1.
    assert majority_at_k(["3", "2", "3", "3"], "3", 2) == 0.75
    assert majority_at_k(["3", "2", "3", "3"], "3", 4) == 1.0
    assert majority_at_k(["3", "2", "3", "3"], "3", 1) == 0.75
    with pytest.raises(ValueError):
        majority_at_k(["3"], "3", 2)


def test_blind_sampler_and_k_values():
    shares = answer_shares({"count_all": ["2", "2", "3", "4"], "add": ["1"]})
    assert shares == {"count_all": {"2": 0.5, "3": 0.25, "4": 0.25}, "add": {"1": 1.0}}
    assert blind_pass_at_k(shares["count_all"], "3", 2) == pytest.approx(1 - 0.75**2)
    assert blind_pass_at_k(shares["count_all"], "9", 8) == 0.0
    assert k_values(16) == [1, 2, 4, 8, 16] and k_values(6) == [1, 2, 4, 6] and k_values(1) == [1]


def test_headroom_by_hand():
    # Three items, K = 4 samples each. Item 0: greedy right, 2 of 4 samples right. Item 1: greedy wrong, 3 of 4
    # right (fixable: >= 3/8 of its samples). Item 2: greedy wrong, never right.
    sampled = [["3", "3", "1", "2"], ["5", "5", "5", "4"], ["0", "1", "1", None]]
    gold = ["3", "5", "2"]
    correct = [[a == g for a in s] for s, g in zip(sampled, gold)]
    blind = [{"3": 0.5, "1": 0.5}, {"5": 0.25, "4": 0.75}, {"2": 0.1, "1": 0.9}]
    h = headroom([True, False, False], sampled, correct, gold, blind, ["perception", "logic", "arithmetic"])
    assert h["n"] == 3 and h["samples"] == 4 and h["greedy"] == pytest.approx(100 / 3, abs=0.01)
    # pass@1 = mean right share = (2/4 + 3/4 + 0) / 3; pass@4 = (1 + 1 + 0) / 3.
    assert h["pass_at_k"][1] == pytest.approx(100 * (0.5 + 0.75) / 3, abs=0.01)
    assert h["pass_at_k"][2] == pytest.approx(100 * ((1 - 1 / 6) + (1 - 0) + 0) / 3, abs=0.01)
    assert h["pass_at_k"][4] == pytest.approx(200 / 3, abs=0.01)
    # majority@4: item 0 [3, 3, 1, 2] -> 3 wins; item 1 -> 5 wins; item 2 [0, 1, 1] -> 1 -> 0.
    assert h["majority_at_k"][4] == pytest.approx(200 / 3, abs=0.01)
    # majority@2: item 0 blocks [3, 3] 1, [1, 2] 0 -> 0.5; item 1 [5, 5] 1, [5, 4] 0.5 -> 0.75; item 2 0.
    assert h["majority_at_k"][2] == pytest.approx(100 * 1.25 / 3, abs=0.01)
    assert h["greedy_wrong"] == 2 and h["fixable"] == pytest.approx(100 / 3, abs=0.01)
    assert h["fixable_of_wrong"] == 50.0 and h["never_right"] == pytest.approx(100 / 3, abs=0.01)
    assert h["blind_pass_at_k"][1] == pytest.approx(100 * (0.5 + 0.25 + 0.1) / 3, abs=0.01)
    # Error kinds count the greedy errors only (item 0 is right: its kind is ignored).
    third = pytest.approx(100 / 3, abs=0.01)
    assert h["error_kinds"] == {"logic": third, "arithmetic": third}
    with pytest.raises(ValueError, match="error kind"):
        headroom([True, False, False], sampled, correct, gold, error_kinds=[None, None, "logic"])
    with pytest.raises(ValueError):
        headroom([True], [["1"], ["2"]], [[True], [False]], ["1", "2"])


SCENE = [{"shape": "cube", "color": "red", "size": "large", "material": "metal"},
         {"shape": "cube", "color": "blue", "size": "small", "material": "rubber"},
         {"shape": "sphere", "color": "red", "size": "small", "material": "rubber"}]


def test_error_kinds_read_against_the_scene():
    ok = "<think>\n### Step 1: I see 2 cubes.\n### Step 2: I see 1 sphere.\n### Step 3: In total 2 + 1 = 3 objects."
    slip = ok.replace("= 3", "= 4")
    assert equations(slip) == [("2 + 1", 3, 4)]
    assert equations("So 5 - 2 = 3. The difference is 3 - 1 = 2.") == [("5 - 2", 3, 3), ("3 - 1", 2, 2)]
    assert error_kind(slip + "\n</think>\n<answer>4</answer>", "4", True, SCENE) == "arithmetic"
    seen_wrong = ok.replace("2 cubes", "3 cubes").replace("2 + 1 = 3", "3 + 1 = 4")
    assert error_kind(seen_wrong + "\n</think>\n<answer>4</answer>", "4", True, SCENE) == "perception"
    # Right counts and sums, wrong conclusion (the answer is not what the steps give).
    assert error_kind(ok + "\n</think>\n<answer>2</answer>", "2", True, SCENE) == "logic"
    assert error_kind("no tags at all", None, False, SCENE) == "format"


def test_signal_to_noise_by_hand():
    agree = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    assert signal_to_noise(agree)["snr"] == pytest.approx(1.0)
    cancel = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    s = signal_to_noise(cancel)
    assert s["snr"] == 0.0 and s["noise_floor"] == 0.5 and s["groups_with_gradient"] == 2
    # Mean (0.5, 0) -> |mean|^2 = 0.25; mean |g|^2 = (1 + 0) / 2 -> 0.5; a zero group still counts in the mean.
    half = signal_to_noise(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert half["snr"] == pytest.approx(0.5) and half["groups_with_gradient"] == 1
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(torch.zeros(2), torch.ones(2)) == 0.0
    with pytest.raises(ValueError):
        signal_to_noise(torch.ones(1, 3))

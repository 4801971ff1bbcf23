"""Outcome rewards: extraction, grading by task type, format, registry, MATH500 self-consistency."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from vlm_mig import rewards as R
from vlm_mig.prompts import format_solution
from vlm_mig.rewards import (
    RewardSpec,
    compute_rewards,
    extract_answer,
    extract_boxed,
    format_reward,
    get_reward_fn,
    grade,
    is_well_formatted,
    register_reward,
)

MATH500 = Path(__file__).resolve().parents[1] / "datasets" / "math500" / "test.jsonl"


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def test_extract_boxed_balanced_braces():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and \boxed{3}") == [r"\frac{1}{2}", "3"]
    assert extract_boxed(r"\boxed{\{1, 2\}}") == [r"\{1, 2\}"]  # escaped braces do not count
    assert extract_boxed(r"\fbox{7}") == ["7"]
    assert extract_boxed(r"\boxed 5$") == ["5"]
    assert extract_boxed(r"\boxed{\frac{1}{2}") == []  # truncated: no guess
    assert extract_boxed(r"\boxedfoo{3}") == []  # another macro
    assert R.last_boxed("no box") is None


def test_extract_answer_tagged():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    # the last complete pair wins, and a nested opening tag is skipped
    assert extract_answer("<answer>1</answer> wait <answer>2</answer>") == "2"
    assert extract_answer("<answer>1<answer>2</answer>") == "2"
    # \boxed inside the answer narrows it to the box content
    assert extract_answer(r"<answer>so it is \boxed{\frac{3}{4}}.</answer>") == r"\frac{3}{4}"
    assert extract_answer("<answer>  </answer>") is None
    assert extract_answer(None) is None


def test_extract_answer_fallback_is_opt_in():
    untagged = r"We get \boxed{12} in the end, not 13."
    assert extract_answer(untagged) is None  # strict default: no tags, no answer
    assert extract_answer(untagged, fallback=True) == "12"  # last box beats last number
    assert extract_answer("so 1,234 apples then 7", fallback=True) == "7"
    assert extract_answer("total is 1,234", fallback=True) == "1,234"
    assert extract_answer("<think>a</think><answer>5", fallback=True) == "5"  # truncated answer tag
    assert extract_answer("no number here", fallback=True) is None


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------


def test_format_reward_cases():
    good = format_solution(["count the cubes", "add the spheres"], "5")
    assert is_well_formatted(good)
    assert is_well_formatted(good, require_step_header=True)
    assert is_well_formatted("\n<think>just text</think>\n\n<answer>5</answer>\n")
    assert not is_well_formatted("<think>just text</think><answer>5</answer>", require_step_header=True)
    bad = [
        "<think>   </think><answer>5</answer>",  # no step at all
        "<think>a</think><answer> </answer>",  # empty answer
        "<think>a</think><answer>5</answer> trailing words",
        "preamble <think>a</think><answer>5</answer>",
        "<think>a</think>",
        "<answer>5</answer>",
        "<think>a</think><answer>5</answer><answer>6</answer>",  # repeated tags
        "<think>a<think>b</think><answer>5</answer>",
        "<think>a</answer><answer>5</answer>",
    ]
    for b in bad:
        assert not is_well_formatted(b), b
    assert format_reward([None] * 2, [good, bad[0]]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("0.5", r"\frac{1}{2}", True),
        (r"\dfrac12", r"\frac{1}{2}", True),
        ("x = 5", "5", True),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"(3,4]", "(3,4]", True),
        (r"(3,4)", "(3,4]", False),
        (r"2\sqrt{2}", r"\sqrt{8}", True),
        (r"\$18.90", r"\$18.90", True),
        (r"\text{Evelyn}", "Evelyn", True),
        ("7", "8", False),
        ("", "8", False),
        (None, "8", False),
    ],
)
def test_grade_math(pred, gold, ok):
    assert grade(pred, gold, "math") is ok


def test_numeric_integer_gold_needs_exact_equality():
    # A relative tolerance on integers accepts a different integer once the gold is large enough.
    assert not grade("120,006", "120000", "numeric") and not grade("120006", "120000", "numeric")
    assert not grade("1000.05", "1000", "numeric") and not grade("0.0000005", "0", "numeric")
    assert grade("120,000", "120000", "numeric") and grade("120000.0", "120000", "numeric")
    assert grade("$1,000", "1000", "numeric") and grade("-2", "-2.0", "numeric") and grade("18", "18.00", "numeric")
    # Any integer form of V(y*) is exact; a non-integer one keeps its tolerance.
    assert grade("2.50001", ["3", "2.5"], "numeric") and not grade("3.0001", ["3", "2.5"], "numeric")


def test_grade_other_tasks():
    # count: integer match, tolerant of spelling
    assert grade("3", "3", "count") and grade("three", "3", "count") and grade("3 objects.", "3", "count")
    assert grade("3.0", "3", "count")
    assert not grade("3.5", "3", "count") and not grade("2 cubes and 3 balls", "3", "count")
    assert not grade("4", "3", "count")
    # numeric: rel 1e-4 / abs 1e-6, after removing , $ %
    assert grade("1,234.5", "1234.5", "numeric") and grade("$12", "12", "numeric")
    assert grade("45%", "45", "numeric") and grade("3/4", "0.75", "numeric")
    assert grade(r"\frac{3}{4}", "0.75", "numeric") and grade("-2", "-2.0", "numeric")
    assert grade("1000.55", "1000.5", "numeric")  # |d| = 0.05 <= 1e-4 * 1000.5
    assert not grade("1000.7", "1000.5", "numeric")
    assert grade("0.0000015", "0.000001", "numeric") and not grade("0.00001", "0.000001", "numeric")
    assert not grade("abc", "1", "numeric") and not grade("1/0", "1", "numeric")
    # mc: option letter
    for p in ["B", "(B)", "B.", "b", "B) 42", "(B) 42", "Option B", "The answer is B."]:
        assert grade(p, "B", "mc"), p
    assert grade("B", r"\text{(B)}", "mc")
    assert not grade("A dog", "A", "mc") and not grade("C", "B", "mc")
    # text: normalised equality
    assert grade("Yes.", "yes", "text") and grade("The Red  Cube", "red cube", "text")
    assert not grade("red cubes", "red cube", "text")
    # gold variants V(y*)
    assert grade("2", ["two", "2"], "count") and grade("dos", ["two", "dos"], "text")
    with pytest.raises(ValueError):
        grade("1", "1", "essay")


def test_math_time_limit_main_thread():
    """An expression sympy cannot finish in time is cut by the per-check limit and graded wrong."""
    t0 = time.monotonic()
    assert not grade("9^{9^{9^{9}}}", "3", "math", timeout_s=1)
    assert time.monotonic() - t0 < 6  # parse + compare, each limited to 1 s


def test_math_off_main_thread_uses_worker_and_survives_hangs():
    """math-verify's SIGALRM limit raises off the main thread; grade must still work and be bounded."""
    out: dict[str, object] = {}

    def run():
        out["ok"] = grade(r"\frac{2}{4}", "0.5", "math")
        out["wrong"] = grade("0.4", "0.5", "math")
        t0 = time.monotonic()
        # The hard wall limit (below math-verify's own) forces the kill-and-restart path.
        out["killed"] = grade("9^{9^{9^{9}}}", "3", "math", timeout_s=5, hard_timeout_s=0.5)
        out["t_kill"] = time.monotonic() - t0
        out["after"] = grade("2", "2.0", "math")  # a fresh worker answers the next check

    th = threading.Thread(target=run)
    th.start()
    th.join(120)
    assert not th.is_alive()
    assert out["ok"] is True and out["wrong"] is False
    assert out["killed"] is False and out["t_kill"] < 3
    assert out["after"] is True


def test_math_process_isolation_on_main_thread():
    assert grade(r"\sqrt{4}", "2", "math", isolation="process")
    assert not grade("3", "2", "math", isolation="process")


# ---------------------------------------------------------------------------------------------
# MATH500: gold answers against their own solutions' last \boxed{}
# ---------------------------------------------------------------------------------------------


def _math500():
    rows = [json.loads(line) for line in MATH500.read_text().splitlines() if line.strip()]
    assert len(rows) == 500
    return rows


def test_math500_gold_matches_own_solution():
    rows = _math500()
    preds = [extract_answer(r["solution"], fallback=True) for r in rows]
    assert all(p is not None for p in preds)
    fails = [(r["answer"], p) for r, p in zip(rows, preds) if not grade(p, r["answer"], "math")]
    assert not fails, fails
    # The same through math-verify alone (grade's exact-string shortcut bypassed), so the 500/500
    # above is not just string identity.
    mv_fails = [(r["answer"], p) for r, p in zip(rows, preds) if not R._mv_check(p, [r["answer"]], 5)]
    assert not mv_fails, mv_fails


def test_math500_shuffled_false_positives():
    """Each gold answer against another problem's solution (fixed-seed permutation).

    Matches between two *identical* answers (``3`` vs ``3``: 8 such pairs with seed 0) are correct
    grades, not false positives. A false positive is a match between answers that differ after
    removing LaTeX spacing/delimiters. Measured: 0; we allow a few for math-verify's known lenient
    cases (e.g. ``x = 5`` accepted for ``5``, numeric rounding to 6 decimals).
    """
    rows = _math500()
    perm = list(range(len(rows)))
    random.Random(0).shuffle(perm)
    same, false_pos = [], []
    for i, j in enumerate(perm):
        if i == j:
            continue
        pred = extract_answer(rows[j]["solution"], fallback=True)
        if grade(pred, rows[i]["answer"], "math"):
            identical = R._latex_canon(pred) == R._latex_canon(rows[i]["answer"])
            (same if identical else false_pos).append((rows[i]["answer"], pred))
    print(f"MATH500 shuffled pairing: {len(same)} identical-answer matches, {len(false_pos)} false positives")
    print("false positives:", false_pos)
    assert len(false_pos) <= 5, false_pos


# ---------------------------------------------------------------------------------------------
# Registry and R_out
# ---------------------------------------------------------------------------------------------

GOOD = format_solution(["two cubes", "plus one sphere"], "3")
UNFORMATTED_RIGHT = "<answer>3</answer>"
FORMATTED_WRONG = format_solution(["two cubes"], "2")


def test_compute_rewards_default_weights():
    comps = [GOOD, UNFORMATTED_RIGHT, FORMATTED_WRONG, "3"]
    r = compute_rewards([""] * 4, comps, answer=["3"] * 4, task="count")
    assert r.components["accuracy"] == [1.0, 1.0, 0.0, 0.0]  # untagged "3" is not paid
    assert r.components["format"] == [1.0, 0.0, 1.0, 0.0]
    assert r.total == [2.0, 1.0, 1.0, 0.0]
    w = compute_rewards(
        [""] * 4, comps, [RewardSpec("accuracy", 2.0), RewardSpec("format", 0.5)], answer="3", task="count"
    )
    assert w.total == [2.5, 2.0, 0.5, 0.0]
    assert w.mean("accuracy") == 0.5


def test_compute_rewards_conversational_and_per_row_columns():
    comps = [
        [{"role": "assistant", "content": GOOD}],
        [{"role": "assistant", "content": [{"type": "text", "text": GOOD}]}],
    ]
    r = compute_rewards(["", ""], comps, answer=["3", ["4", "three"]], task=["count", "count"])
    assert r.components["accuracy"] == [1.0, 1.0]
    r = compute_rewards(
        ["", ""], [GOOD, GOOD], answer=["three", "4"], answer_variants=[["3"], None], task="text"
    )
    assert r.components["accuracy"] == [1.0, 0.0]


def test_plugin_module_function_and_none(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_plugin.py").write_text(
        "def length_bonus(prompts, completions, **kw):\n"
        "    return [None if c == 'skip' else float(len(c) > 5) for c in completions]\n"
        "def bad_nan(prompts, completions, **kw):\n"
        "    return [float('nan')] * len(completions)\n"
        "def bad_len(prompts, completions, **kw):\n"
        "    return [1.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = [RewardSpec("format"), RewardSpec("my_rewards_plugin:length_bonus", 0.5)]
    r = compute_rewards(["", "", ""], [GOOD, "skip", "tiny"], specs)
    # None = not applicable: adds nothing to the total and is left out of the mean
    assert r.components["my_rewards_plugin:length_bonus"] == [1.0, None, 0.0]
    assert r.total == [1.5, 0.0, 0.0]
    assert r.mean("my_rewards_plugin:length_bonus") == 0.5
    with pytest.raises(ValueError, match="non-finite"):
        compute_rewards([""], ["x"], [RewardSpec("my_rewards_plugin:bad_nan")])
    with pytest.raises(ValueError, match="returned 1 values"):
        compute_rewards(["", ""], ["x", "y"], [RewardSpec("my_rewards_plugin:bad_len")])
    with pytest.raises(AttributeError):
        get_reward_fn("my_rewards_plugin:missing")
    with pytest.raises(ImportError):
        get_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(KeyError):
        get_reward_fn("no_such_reward")


def test_overlong_penalty_by_hand():
    """DAPO's soft overlong punishment with L_max = 20, L_cache = 8, factor 0.5: free up to 12 tokens, a linear ramp
    to -0.5 at 20, -0.5 past the cap; as verl's ``min(-(|y| - 12) / 8 * 0.5, 0)`` up to the cap."""
    pen = [R.overlong_penalty(n, 20, 8, 0.5) for n in (1, 12, 13, 16, 19, 20, 21, 40)]
    assert pen == [0.0, 0.0, -0.0625, -0.25, -0.4375, -0.5, -0.5, -0.5]
    for n in range(1, 21):
        assert R.overlong_penalty(n, 20, 8, 0.5) == pytest.approx(min(-(n - 12) / 8 * 0.5, 0))
    assert [R.overlong_penalty(n, 4, 4) for n in (0, 1, 2, 4)] == [0.0, -0.25, -0.5, -1.0]  # the whole cap a buffer
    assert {R.overlong_penalty(n, 20, 0, 3.0) for n in (1, 20, 25)} == {0.0}  # buffer 0: off
    assert R.overlong_penalty(20, 20, 8, 0.0) == 0.0
    with pytest.raises(ValueError, match="longer than max_length"):
        R.overlong_penalty(5, 4, 8)
    with pytest.raises(ValueError, match=">= 0"):
        R.overlong_penalty(5, 20, -1)
    # as a reward component: the weighted sum adds it to accuracy and format, and logs it on its own
    specs = [RewardSpec("accuracy"), RewardSpec("format"),
             RewardSpec("overlong", 1.0, {"max_length": 20, "buffer": 8, "penalty": 0.5})]
    r = compute_rewards([""] * 3, [GOOD, GOOD, FORMATTED_WRONG], specs, answer="3", task="count",
                        completion_length=[10, 16, 20])
    assert r.components["overlong"] == [0.0, -0.25, -0.5]
    assert r.total == [2.0, 1.75, 0.5]
    with pytest.raises(ValueError, match="completion_length"):
        compute_rewards([""], [GOOD], specs, answer="3", task="count")


def test_register_reward_decorator():
    @register_reward("always_one_test")
    def always_one(prompts, completions, **kw):
        return [1.0] * len(completions)

    try:
        assert "always_one_test" in R.registered_rewards()
        r = compute_rewards(["", ""], ["a", "b"], [RewardSpec("always_one_test", 3.0)])
        assert r.total == [3.0, 3.0]
    finally:
        R._REGISTRY.pop("always_one_test")
    with pytest.raises(ValueError):
        register_reward("a:b", always_one)


def test_accuracy_reward_needs_answer_and_none_gold():
    with pytest.raises(ValueError, match="answer"):
        compute_rewards([""], [GOOD])
    r = compute_rewards(["", ""], [GOOD, GOOD], answer=["3", None], task="count")
    assert r.components["accuracy"] == [1.0, None]

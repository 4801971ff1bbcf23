"""Multi-step arithmetic word problems (text only) with gold steps and labelled step defects.

A problem is a start amount and a chain of operations, e.g. "Tom has 5 apples. He buys 3 more, then
gives away 2, then doubles them. How many apples does Tom have now?", solved one operation per step:
``"Tom buys 3 more: 5 + 3 = 8."``, ``"Tom gives away 2: 8 - 2 = 6."``,
``"Tom doubles them: 6 * 2 = 12. So Tom has 12 apples now."`` (the last step states the result).
The number of operations is the difficulty knob: chains longer than the training range are
out-of-distribution.

Step labels (``meta["step_labels"]``, one per step, for the study of which steps the process reward
credits):

* ``correct``: the step's own arithmetic is right, given the value it starts from;
* ``redundant``: restates a fact already known (the start amount, or the amount after the previous
  step) and changes nothing;
* ``wrong``: the step's arithmetic is wrong (its result is off by a non-zero amount).

A wrong step either **propagates** (later steps compute from the wrong value, correctly, so they are
labelled ``correct`` and the solution's final answer is wrong) or not (later steps continue from the
true value, so the final answer stays right but the chain is inconsistent). Labels judge each step's
own arithmetic, never whether the chain reaches the gold answer.

:func:`solution_variants` gives, for one problem, the correct solution and the defective variants.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_mig.data.schema import DataError, Sample
from vlm_mig.prompts import format_solution

STEP_LABELS = ("correct", "redundant", "wrong")
NAMES = (("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"),
         ("Max", "He"), ("Zoe", "She"), ("Leo", "He"), ("Emma", "She"))  # fmt: skip
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cookies", "cards", "shells", "stamps")
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
#: Relative weights of the operation kinds (among those allowed at the current amount).
OP_WEIGHTS = {"add": 0.35, "sub": 0.3, "mul": 0.2, "div": 0.15}
NUM_STEPS = (2, 4)  #: operations per problem, an inclusive range (the default of the CLI and DataConfig too)
MAX_VALUE = 200  # multiplications stop here so that long chains keep small numbers


@dataclass(frozen=True)
class Op:
    """One operation: ``kind`` in add/sub/mul/div, its operand, and its verb phrase ("buys 3 more")."""

    kind: str
    operand: int
    phrase: str

    def apply(self, value: int) -> int:
        """The amount after this operation (division is only generated where it is exact)."""
        if self.kind == "add":
            return value + self.operand
        if self.kind == "sub":
            return value - self.operand
        if self.kind == "mul":
            return value * self.operand
        return value // self.operand


@dataclass(frozen=True)
class ArithmeticProblem:
    """A start amount of some item owned by a person, and a chain of operations on it."""

    name: str
    pronoun: str
    item: str
    start: int
    ops: tuple[Op, ...]

    def values(self) -> list[int]:
        """The amounts ``[start, after op 1, ..., after op K]``."""
        out = [self.start]
        for op in self.ops:
            out.append(op.apply(out[-1]))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def question(self) -> str:
        phrases = ", then ".join(op.phrase for op in self.ops)
        return (
            f"{self.name} has {self.start} {self.item}. {self.pronoun} {phrases}. "
            f"How many {self.item} does {self.name} have now?"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pronoun": self.pronoun,
            "item": self.item,
            "start": self.start,
            "ops": [[op.kind, op.operand, op.phrase] for op in self.ops],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArithmeticProblem:
        """Rebuild a problem, e.g. from a sample's ``meta["problem"]``."""
        ops = tuple(Op(str(k), int(n), str(p)) for k, n, p in d["ops"])
        return cls(str(d["name"]), str(d["pronoun"]), str(d["item"]), int(d["start"]), ops)


@dataclass(frozen=True)
class Solution:
    """Step texts (without ``### Step i:`` headers), one label per step, and the answer they reach."""

    steps: tuple[str, ...]
    labels: tuple[str, ...]
    answer: int

    def text(self) -> str:
        """The completion in the reasoning format (``<think>### Step 1: ...</think><answer>..``)."""
        return format_solution(list(self.steps), str(self.answer))


# ---------------------------------------------------------------------------------------- problems


def _random_op(rng: random.Random, value: int) -> Op:
    """An operation that keeps the amount a non-negative integer no larger than :data:`MAX_VALUE`."""
    allowed = {
        "add": True,
        "sub": value >= 1,
        "mul": 1 <= value <= MAX_VALUE // 2,
        "div": value >= 2 and value % 2 == 0,
    }
    kinds = [k for k, ok in allowed.items() if ok]
    kind = rng.choices(kinds, weights=[OP_WEIGHTS[k] for k in kinds])[0]
    if kind == "add":
        n = rng.randint(1, 15)
        return Op("add", n, rng.choice((f"buys {n} more", f"finds {n} more", f"gets {n} more from a friend")))
    if kind == "sub":
        n = rng.randint(1, min(value, 15))
        return Op("sub", n, rng.choice((f"gives away {n}", f"loses {n}", f"sells {n}")))
    if kind == "mul":
        n = 2 if value * 3 > MAX_VALUE else rng.choice((2, 3))
        return Op("mul", n, "doubles them" if n == 2 else "triples them")
    return Op("div", 2, "gives away half of them")


def sample_problem(rng: random.Random, num_ops: int) -> ArithmeticProblem:
    """A random problem with ``num_ops`` operations."""
    if num_ops < 1:
        raise DataError(f"a problem needs at least 1 operation, got {num_ops}")
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = start = rng.randint(2, 20)
    ops = []
    for _ in range(num_ops):
        op = _random_op(rng, value)
        ops.append(op)
        value = op.apply(value)
    return ArithmeticProblem(name, pronoun, item, start, tuple(ops))


# --------------------------------------------------------------------------------------- solutions


def _op_step(problem: ArithmeticProblem, op: Op, before: int, result: int, last: bool) -> str:
    """ "Tom buys 3 more: 5 + 3 = 8." (``result`` as written, right or not); the last step adds the result."""
    text = f"{problem.name} {op.phrase}: {before} {SYMBOL[op.kind]} {op.operand} = {result}."
    if last:
        text += f" So {problem.name} has {result} {problem.item} now."
    return text


def correct_solution(problem: ArithmeticProblem) -> Solution:
    """One step per operation, every step correct."""
    values = problem.values()
    k = len(problem.ops)
    steps = tuple(
        _op_step(problem, op, values[i], values[i + 1], i == k - 1) for i, op in enumerate(problem.ops)
    )
    return Solution(steps, ("correct",) * k, values[-1])


def with_redundant_step(problem: ArithmeticProblem, position: int) -> Solution:
    """The correct solution with a redundant step inserted before operation ``position`` (0..K).

    At position 0 it restates the start amount from the question; later, the amount after the
    previous step ("Tom now has 8 apples."). At position K it restates the final amount and so
    becomes the last step, which still states the result.
    """
    k = len(problem.ops)
    if not 0 <= position <= k:
        raise DataError(f"redundant step position must be in 0..{k}, got {position}")
    base = correct_solution(problem)
    value = problem.values()[position]
    if position == 0:
        extra = f"{problem.name} starts with {value} {problem.item}."
    else:
        extra = f"{problem.name} now has {value} {problem.item}."
    steps = base.steps[:position] + (extra,) + base.steps[position:]
    labels = base.labels[:position] + ("redundant",) + base.labels[position:]
    return Solution(steps, labels, base.answer)


def safe_error(problem: ArithmeticProblem, position: int, propagate: bool, rng: random.Random) -> int:
    """An error amount for step ``position`` that keeps every amount written a non-negative integer.

    Without propagation: +-1..3, never below 0. With propagation the error is positive (later
    subtractions stay non-negative) and a multiple of 2**(halvings after the step) (later halvings
    stay exact).
    """
    result = problem.values()[position + 1]
    if propagate:
        halvings = sum(op.kind == "div" for op in problem.ops[position + 1 :])
        return rng.randint(1, 3) * 2**halvings
    choices = [d for d in (-3, -2, -1, 1, 2, 3) if result + d >= 0]
    return rng.choice(choices)


def with_wrong_step(
    problem: ArithmeticProblem, position: int, error: int, propagate: bool = True
) -> Solution:
    """The solution with the result of operation ``position`` (0-based) off by ``error`` (non-zero).

    ``propagate=True``: later steps compute correctly from the wrong value, and the solution's answer
    is wrong. ``propagate=False``: later steps start from the true value again, so the answer is right.
    Only the corrupted step is labelled ``wrong``.
    """
    k = len(problem.ops)
    if not 0 <= position < k:
        raise DataError(f"wrong step position must be in 0..{k - 1}, got {position}")
    if error == 0:
        raise DataError("a wrong step needs a non-zero error")
    true_values = problem.values()
    steps, labels = [], []
    value = problem.start
    for i, op in enumerate(problem.ops):
        before = value if propagate else true_values[i]
        result = op.apply(before)
        if propagate and op.kind == "div" and before % op.operand:
            raise DataError(
                f"error {error} at step {position} makes a later halving inexact; see safe_error()"
            )
        if i == position:
            result += error
            if result < 0:
                raise DataError(f"error {error} at step {position} makes the amount negative")
        steps.append(_op_step(problem, op, before, result, i == k - 1))
        labels.append("wrong" if i == position else "correct")
        value = result
    return Solution(tuple(steps), tuple(labels), value)


def solution_variants(problem: ArithmeticProblem, seed: int = 0) -> dict[str, Solution]:
    """For one problem: ``correct``, ``redundant`` (one restating step inserted), ``wrong_local`` (one
    step's arithmetic wrong, later steps from the true values) and ``wrong_propagated`` (one step
    wrong, later steps from the wrong value). Positions and errors are drawn from ``seed``; the
    ``wrong_local`` error sits before the last step when K >= 2, so that its final answer stays right
    (only its reasoning is flawed), while ``wrong_propagated`` ends on a wrong answer."""
    rng = random.Random(f"vlm-mig-variants:{seed}:{json.dumps(problem.to_dict())}")
    k = len(problem.ops)
    local_pos, prop_pos = rng.randrange(max(1, k - 1)), rng.randrange(k)
    return {
        "correct": correct_solution(problem),
        "redundant": with_redundant_step(problem, rng.randint(0, k)),
        "wrong_local": with_wrong_step(problem, local_pos, safe_error(problem, local_pos, False, rng), False),
        "wrong_propagated": with_wrong_step(
            problem, prop_pos, safe_error(problem, prop_pos, True, rng), True
        ),
    }


# -------------------------------------------------------------------------------------- generation


def _step_range(num_steps: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (num_steps, num_steps) if isinstance(num_steps, int) else tuple(num_steps)
    if not 1 <= lo <= hi:
        raise DataError(f"num_steps must be >= 1 or a range (lo, hi) with 1 <= lo <= hi, got {num_steps!r}")
    return int(lo), int(hi)


def make_arithmetic(
    n: int,
    seed: int = 0,
    num_steps: int | tuple[int, int] = NUM_STEPS,
    error_rate: float = 0.0,
    error_kinds: tuple[str, ...] = ("redundant", "wrong"),
    propagate: bool = True,
) -> list[Sample]:
    """``n`` problems (task ``numeric``, integer answer strings) with ``num_steps`` operations each.

    With probability ``error_rate`` a problem's ``gold_steps`` get one injected defect of a kind drawn
    from ``error_kinds`` (``"redundant"`` or ``"wrong"``; a wrong step propagates per ``propagate``):
    such steps are then **not** gold. ``answer`` is always the true answer; ``meta`` holds
    ``step_labels`` (aligned with ``gold_steps``), ``solution_answer`` (what the steps reach),
    ``injected`` ("none", "redundant" or "wrong") and ``problem`` (for :meth:`ArithmeticProblem.from_dict`).
    Problem ``i`` depends only on ``(seed, i, num_steps)``, not on the error settings.
    """
    lo, hi = _step_range(num_steps)
    if not 0.0 <= error_rate <= 1.0:
        raise DataError(f"error_rate must be in [0, 1], got {error_rate}")
    bad = [k for k in error_kinds if k not in ("redundant", "wrong")]
    if bad or (error_rate > 0 and not error_kinds):
        raise DataError(
            f"error_kinds must be a non-empty subset of ('redundant', 'wrong'), got {error_kinds!r}"
        )
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    samples = []
    for i in range(n):
        rng = random.Random(f"vlm-mig-arith:{seed}:{i}")
        problem = sample_problem(rng, rng.randint(lo, hi))
        k = len(problem.ops)
        # Decide on a defect with a separate stream so the problems do not depend on error settings.
        err_rng = random.Random(f"vlm-mig-arith-err:{seed}:{i}")
        injected = "none"
        solution = correct_solution(problem)
        if err_rng.random() < error_rate:
            injected = err_rng.choice(error_kinds)
            if injected == "redundant":
                solution = with_redundant_step(problem, err_rng.randint(0, k))
            else:
                pos = err_rng.randrange(k)
                solution = with_wrong_step(
                    problem, pos, safe_error(problem, pos, propagate, err_rng), propagate
                )
        samples.append(
            Sample(
                id=f"arith_{seed}_{i:06d}",
                answer=str(problem.answer),
                task="numeric",
                question=problem.question,
                gold_steps=list(solution.steps),
                meta={
                    "source": "synthetic_arithmetic",
                    "num_steps": k,
                    "step_labels": list(solution.labels),
                    "solution_answer": str(solution.answer),
                    "injected": injected,
                    "problem": problem.to_dict(),
                },
            )
        )
    return samples


def write_arithmetic(
    path: str | Path,
    n: int,
    seed: int = 0,
    num_steps: int | tuple[int, int] = NUM_STEPS,
    error_rate: float = 0.0,
    error_kinds: tuple[str, ...] = ("redundant", "wrong"),
    propagate: bool = True,
) -> list[Sample]:
    """Write :func:`make_arithmetic` samples to ``path`` as jsonl (one ``Sample.to_dict()`` a line)."""
    samples = make_arithmetic(n, seed, num_steps, error_rate, error_kinds, propagate)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in samples)
    return samples

"""An imperfect teacher: SFT targets whose errors are systematic and sit in one identifiable step.

SFT data distilled from a weaker model carries that model's habits. The teacher here is right about what it
sees and slips on arithmetic: in a solution whose last step computes a result (``In total 2 + 1 = 3.``,
``So 5 - 2 = 3.``, ``The difference is 3 - 1 = 2.``), that result, and so the answer, is one too high with
probability ``rate``. Every counting step stays right, and the slip is always in the last step, so

* a model trained on it learns a shared, cheap-to-fix error that RL can find (the right result is in its
  sampling distribution whenever ``rate < 1``), on top of its own perception errors, which RL cannot fix;
* the SFT on the clean gold steps is the known ceiling, and a process reward can be checked for pointing at
  the faulty step.

Only the SFT file is rewritten: RL rewards and every evaluation grade against the true answer. A rewritten
row keeps its true answer in ``meta["gold_answer"]`` and names the slip in ``meta["teacher"]``.
Pure functions of their inputs and a seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from vlm_mig.data.schema import DataError, Sample

#: The result of a step that computes one: the number after the last "=" (and what follows it).
_RESULT = re.compile(r"= (\d+)(\D*)$")


def slip_result(steps: list[str], answer: str, slip: int = 1) -> tuple[list[str], str] | None:
    """``steps`` with the last step's computed result (the number after its ``=``) moved by ``slip``, and the
    answer that follows; None when the last step computes nothing or its result is not the answer."""
    if not steps:
        return None
    m = _RESULT.search(steps[-1])
    if m is None or m.group(1) != answer:
        return None
    wrong = str(int(answer) + slip)
    if int(wrong) < 0:
        return None
    return [*steps[:-1], steps[-1][: m.start(1)] + wrong + m.group(2)], wrong


def slips(sample: Sample, rate: float, seed: int) -> bool:
    """Whether the teacher slips on ``sample``: a draw of its own stream, keyed on the seed and the sample id
    (so a row's fate does not depend on the other rows or their order)."""
    return random.Random(f"vlm-mig-teacher:{seed}:{sample.id}").random() < rate


def imperfect_teacher(samples: list[Sample], rate: float, seed: int = 0, slip: int = 1) -> list[Sample]:
    """The SFT rows an arithmetic-slipping teacher would write: each row whose last step computes its answer
    gets, with probability ``rate``, that result and the answer moved by ``slip``; the others are unchanged."""
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"teacher error rate (data.teacher_error_rate) must be in [0, 1], got {rate}")
    if slip == 0:
        raise DataError("teacher slip (data.teacher_slip) of 0 changes nothing")
    out = []
    for s in samples:
        wrong = slip_result(s.gold_steps or [], s.answer, slip) if slips(s, rate, seed) else None
        if wrong is None:
            out.append(s)
            continue
        steps, answer = wrong
        out.append(replace(s, gold_steps=steps, answer=answer,
                           meta={**s.meta, "gold_answer": s.answer, "teacher": f"last result {slip:+d}"}))
    return out

"""How much room RL has on a start, measured before training: pure arithmetic on graded completions.

RL with an outcome reward can only move probability between completions the policy already samples. So the
room it has on a start is read off K samples per item at the rollout temperature, beside the greedy answer
that evaluation reports:

* ``pass@k`` (k = 1 .. K): an item RL can learn from has right answers among its samples;
* ``majority@k``: the answer most samples give; when it beats greedy, sharpening the distribution helps;
* the **blind sampler**'s pass@k: a sampler that draws each answer from the training answers of the item's
  question type, never looking at the image. A model whose pass@k is no better has nothing in its samples
  that the question type alone does not give;
* **fixable**: the share of items wrong under greedy but right in at least ``fixable_share`` (3 of 8) of the
  samples, which a small shift of probability turns right;
* error kinds of the greedy answers (``vlm_mig.data.clevr.error_kind``): perception errors need a better
  reading of the image, which RL on a few thousand rollouts does not add; arithmetic slips and logic errors
  are behaviour shared across prompts, which it can.

``majority@k`` over k < K averages the K / k disjoint blocks of k samples (samples are exchangeable: each
comes from its own seeded stream); a tie counts as the share of tied answers that are right.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from vlm_mig.evaluation.passk import pass_at_k

#: Share of an item's samples that must be right for a greedy error to count as fixable (3 of 8).
FIXABLE_SHARE = 3 / 8


def majority_vote(answers: Sequence[str | None], gold: str) -> float:
    """1 if ``gold`` is the most common answer, the share of the tied answers it is among a tie, else 0;
    unanswered samples (None) never win."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winners = [a for a, c in counts.items() if c == top]
    return 1.0 / len(winners) if gold in winners else 0.0


def majority_at_k(answers: Sequence[str | None], gold: str, k: int) -> float:
    """majority@k of one item from its K samples: the mean vote over the ``K // k`` disjoint blocks of ``k``."""
    K = len(answers)
    if not 1 <= k <= K:
        raise ValueError(f"majority@k needs 1 <= k <= K, got k={k}, K={K}")
    blocks = K // k
    return sum(majority_vote(answers[b * k : (b + 1) * k], gold) for b in range(blocks)) / blocks


def blind_pass_at_k(answer_share: dict[str, float], gold: str, k: int) -> float:
    """pass@k of a sampler that draws each of ``k`` answers independently from ``answer_share`` (answer ->
    probability, e.g. the training answers of the item's question type): ``1 - (1 - p(gold))^k``."""
    return 1.0 - (1.0 - answer_share.get(gold, 0.0)) ** k


def answer_shares(answers_by_type: dict[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Question type -> answer -> its share of that type's answers (the blind sampler's distribution)."""
    out = {}
    for t, answers in answers_by_type.items():
        c = collections.Counter(answers)
        out[t] = {a: n / len(answers) for a, n in c.items()}
    return out


def k_values(K: int) -> list[int]:
    """The k reported up to K: powers of two, and K."""
    ks, k = [], 1
    while k < K:
        ks.append(k)
        k *= 2
    return [*ks, K]


def headroom(greedy_correct: Sequence[bool], sampled: Sequence[Sequence[str | None]],
             sampled_correct: Sequence[Sequence[bool]], gold: Sequence[str],
             blind_share: Sequence[dict[str, float]] | None = None,
             error_kinds: Sequence[str | None] | None = None,
             fixable_share: float = FIXABLE_SHARE) -> dict[str, Any]:
    """The headroom table of one start over n items with K samples each (item i: ``sampled[i]`` its extracted
    answers, ``sampled_correct[i]`` their verdicts, ``gold[i]``, ``blind_share[i]`` the blind sampler's answer
    distribution for it, ``error_kinds[i]`` the kind of its greedy error or None when right). Percentages."""
    n = len(gold)
    if not n or not (len(greedy_correct) == len(sampled) == len(sampled_correct) == n):
        raise ValueError("headroom needs the same n > 0 items in every argument")
    K = len(sampled[0])
    if K < 1 or any(len(s) != K for s in sampled) or any(len(c) != K for c in sampled_correct):
        raise ValueError("headroom needs the same K >= 1 samples for every item")
    ks = k_values(K)
    right = [sum(c) for c in sampled_correct]

    def pct(x: float) -> float:
        return round(100.0 * x, 2)

    wrong = [i for i in range(n) if not greedy_correct[i]]
    out: dict[str, Any] = {
        "n": n, "samples": K,
        "greedy": pct(sum(map(bool, greedy_correct)) / n),
        "pass_at_k": {k: pct(sum(pass_at_k(K, c, k) for c in right) / n) for k in ks},
        "majority_at_k": {k: pct(sum(majority_at_k(sampled[i], gold[i], k) for i in range(n)) / n) for k in ks},
        "greedy_wrong": len(wrong),
        "fixable": pct(sum(right[i] >= fixable_share * K for i in wrong) / n),
        "fixable_of_wrong": pct(sum(right[i] >= fixable_share * K for i in wrong) / len(wrong)) if wrong else None,
        "never_right": pct(sum(r == 0 for r in right) / n),
    }
    if blind_share is not None:
        out["blind_pass_at_k"] = {k: pct(sum(blind_pass_at_k(blind_share[i], gold[i], k) for i in range(n)) / n)
                                  for k in ks}
    if error_kinds is not None:
        if any(error_kinds[i] is None for i in wrong):
            raise ValueError("headroom needs an error kind for every item wrong under greedy")
        kinds = collections.Counter(k for k, ok in zip(error_kinds, greedy_correct) if not ok)
        out["error_kinds"] = {k: pct(v / n) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    return out

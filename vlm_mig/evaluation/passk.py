"""pass@k: the unbiased estimator of Chen et al. (2021) and the k reported for K samples."""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"): the probability that at
    least one of ``k`` samples drawn without replacement from the ``n`` is correct. Python integers
    are exact, so the ratio is computed without overflow or cancellation.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_k_values(num_samples: int) -> list[int]:
    """The k reported for K samples: 1, the powers of two below K, and K."""
    ks = {1, num_samples}
    k = 2
    while k < num_samples:
        ks.add(k)
        k *= 2
    return sorted(ks)

"""P-values of the ownership tests, each under a stated null hypothesis and exact or a proven bound.

The tests share one design: the owner's secret is drawn at random *after* everything a suspect could depend on
without the owner's release, so under the null "the suspect was made without the released model" the suspect is
independent of the secret, and the statistic's null distribution comes from the secret's randomness alone, not
from any model of how people fine-tune or merge. That is what keeps the false-positive rate at its stated level for
the hard negatives: an honest third party who fine-tuned the owner's own task never saw the secret.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["binomial_tail", "bonferroni", "hoeffding_tail", "log10_hoeffding_tail"]


def hoeffding_tail(z: float) -> float:
    """Upper bound on ``P(Z >= z)`` for ``Z = sum(s_i * m_i) / ||m||`` with independent random signs ``s_i``.

    Hoeffding's inequality for Rademacher sums gives ``P(Z >= z) <= exp(-z**2 / 2)`` for any fixed ``m``, so it
    is a valid p-value whatever the suspect's weights are, as long as they do not depend on the signs.

    Args:
        z: The normalised statistic.

    Returns:
        The bound, ``1.0`` for ``z <= 0``.

    Example:
        >>> round(hoeffding_tail(3.0), 4)
        0.0111
    """
    return 1.0 if not z > 0 else math.exp(-z * z / 2.0)


def log10_hoeffding_tail(z: float) -> float:
    """``log10`` of :func:`hoeffding_tail` without underflow (the bound is ``0.0`` in floating point past z ≈ 38).

    Example:
        >>> round(log10_hoeffding_tail(40.0))
        -347
    """
    return 0.0 if not z > 0 else -z * z / (2.0 * math.log(10.0))


def binomial_tail(hits: int, n: int, p: float) -> float:
    """Exact ``P(X >= hits)`` for ``X ~ Binomial(n, p)``.

    Args:
        hits: Observed successes.
        n: Trials.
        p: Success probability under the null.

    Returns:
        The tail probability.

    Raises:
        ValueError: If ``n < 0``, ``hits`` outside ``[0, n]`` or ``p`` outside ``[0, 1]``.

    Example:
        >>> binomial_tail(0, 5, 0.1), round(binomial_tail(5, 5, 0.1), 10)
        (1.0, 1e-05)
    """
    if n < 0 or not 0 <= hits <= n:
        raise ValueError(f"need 0 <= hits <= n, got hits={hits}, n={n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if hits == 0:
        return 1.0
    return min(1.0, math.fsum(math.comb(n, k) * p**k * (1.0 - p) ** (n - k) for k in range(hits, n + 1)))


def bonferroni(p_values: Sequence[float]) -> float:
    """Family-wise p-value of several tests (``min(1, k * min(p))``): valid under any dependence between them.

    Example:
        >>> bonferroni([0.01, 0.5])
        0.02
    """
    if not p_values:
        raise ValueError("no p-values to combine")
    return min(1.0, len(p_values) * min(p_values))

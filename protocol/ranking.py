"""Rank correlation of APEM with the loss over a set [doValle2019, §5.4].

numpy and the standard library only: an RQ worker correlates the per-image values that
TorchServe computed batch by batch, and the service image carries neither torch nor scipy.
:func:`handlers.metrics.apem.apem` uses the same function for one batch. The test compares
it with ``scipy.stats.spearmanr``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function, for ``0 <= x <= 1``."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def spearman_with_loss(apem_values: np.ndarray, losses: np.ndarray) -> dict[str, Any] | None:
    """Spearman rank correlation of per-image APEM and loss (section 5.4, table 5.3).

    ``rho`` is the Pearson correlation of the average ranks; ``p_value`` the two-sided
    p-value of ``t = rho * sqrt(df / (1 - rho^2))`` under Student's t with ``df = n - 2``
    degrees of freedom (as scipy computes it): ``I_{df / (df + t^2)}(df / 2, 1 / 2)``,
    where ``df / (df + t^2) = 1 - rho^2``.

    Returns ``{"rho", "p_value", "n"}``, or ``None`` when it is undefined: fewer than three
    images, or either side constant.
    """
    apem_values, losses = np.asarray(apem_values, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    n = apem_values.size
    if n < 3 or np.ptp(apem_values) == 0 or np.ptp(losses) == 0:
        return None
    ranks_a, ranks_b = average_ranks(apem_values), average_ranks(losses)
    rho = float(np.clip(np.corrcoef(ranks_a, ranks_b)[0, 1], -1.0, 1.0))
    p_value = 0.0 if abs(rho) == 1.0 else regularized_beta((n - 2) / 2, 0.5, 1.0 - rho * rho)
    return {"rho": rho, "p_value": float(p_value), "n": int(n)}

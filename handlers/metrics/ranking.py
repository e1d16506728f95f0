"""Rank correlation of APEM with the loss over a set (thesis 003, section 5.4).

Torch-free (numpy and scipy), so that an RQ worker can correlate the per-image values that
TorchServe computed batch by batch, the same way :func:`handlers.metrics.apem.apem` does
for one batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import spearmanr


def spearman_with_loss(apem_values: np.ndarray, losses: np.ndarray) -> dict[str, Any] | None:
    """Spearman rank correlation of per-image APEM and loss (section 5.4, table 5.3).

    Returns ``{"rho", "p_value", "n"}``, or ``None`` when it is undefined: fewer than three
    images, or either side constant.
    """
    apem_values, losses = np.asarray(apem_values, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if apem_values.size < 3 or np.ptp(apem_values) == 0 or np.ptp(losses) == 0:
        return None
    rho, p_value = spearmanr(apem_values, losses)
    return {"rho": float(rho), "p_value": float(p_value), "n": int(apem_values.size)}

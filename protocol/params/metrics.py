"""Parameters of APEM and the Explanation Filter ([doValle2019, ch. 3, §5.2, Alg. 2]):
pydantic and the standard library only, so that the gateway can refuse bad values when a
request or job arrives, before TorchServe or a worker spends time on it.

:class:`SisParams` (the ``sis`` explainer's, which the overinterpretation job checks) lives
with the other explainers' in :mod:`protocol.params.explainers`; it is importable here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from protocol.budget import MAX_BATCH_SIZE
from protocol.params.explainers import SisParams
from protocol.validation import StrictParams

__all__ = ["GRID_UNIT", "ApemParams", "FilterParams", "Grid", "SisParams"]

GRID_UNIT = "L1 norm of x' - x over the 3 channels, in [0, 1] pixel units (before clipping)"


@dataclass(frozen=True)
class Grid:
    """``eps_k = k * step`` for ``k = 1..max_steps`` (the thesis steps by integers: step 1)."""

    step: float
    max_steps: int

    @property
    def cap(self) -> float:
        """The size that stands in for "beyond the grid": ``(max_steps + 1) * step``."""
        return (self.max_steps + 1) * self.step


class ApemParams(StrictParams):
    """APEM settings.

    Attributes:
        step: grid spacing of ``eps`` (thesis: integer steps, 1).
        max_steps: grid size; ``eps`` beyond ``max_steps * step`` counts as not found.
        search: ``"exact"`` (the sequential scan's answer: margin bounds prove runs of
            the grid flip-free, the rest is evaluated in batches), ``"sequential"`` (the
            thesis's loop, one pass per ``eps``; slow) or ``"approximate"`` (exponential
            then bisection; flagged approximate).
        batch_size: perturbed images per forward pass.
        first_chunk: grid points per unit in the first proof (or, where the model has no
            bounds, the first pass) of the exact search.
        clip: clip perturbed images to [0, 1] (the thesis's ``x'`` is not clipped; clipped
            paths are not segments, so their exact search evaluates every point).
        normalise: also compute ``APEM_norm`` from shuffled maps (section 5.2).
        shuffles: shuffled maps per image for ``APEM_norm`` (thesis: 10).
        seed: seed of the shuffles.

    The upper bounds keep one request from holding a TorchServe worker for hours or asking
    for more memory than the host has (the thesis: about 2000 integer steps, 10 shuffles).
    """

    step: float = Field(1.0, gt=0)
    max_steps: int = Field(2000, ge=1, le=100_000)
    search: Literal["exact", "sequential", "approximate"] = "exact"
    batch_size: int = Field(128, ge=1, le=MAX_BATCH_SIZE)
    first_chunk: int = Field(16, ge=1, le=65536)
    clip: bool = False
    normalise: bool = False
    shuffles: int = Field(10, ge=1, le=100)
    seed: int = Field(0, ge=0)

    @property
    def grid(self) -> Grid:
        return Grid(self.step, self.max_steps)

    def grid_description(self) -> dict[str, Any]:
        return {"step": self.step, "max_steps": self.max_steps, "cap": self.grid.cap, "unit": GRID_UNIT}


class FilterParams(StrictParams):
    """Explanation Filter settings (the APEM settings travel separately).

    Attributes:
        candidates_per_batch: candidate maps scored together in the first batch; the batch
            doubles while no APEM drop is found, up to ``max_candidates_per_batch``.
        max_candidates_per_batch: upper bound of a batch (memory: two directions of the
            image's size per candidate).
        levels: if set, quantise the map to ``levels`` evenly spaced values in [0, 1]
            first (as an 8-bit rendered heatmap is, with 256), which bounds the number of
            distinct values and so the filter's cost; ``None`` keeps the values as given.
    """

    candidates_per_batch: int = Field(8, ge=1, le=MAX_BATCH_SIZE)
    max_candidates_per_batch: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    levels: int | None = Field(None, ge=2, le=1 << 24)

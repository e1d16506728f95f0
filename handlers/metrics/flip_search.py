"""Searches for the smallest perturbation size on a grid that changes a prediction.

APEM (thesis 003, chapter 3 and figure 3.1, steps 3-7) perturbs an image as
``x' = x + eps * d`` for a direction ``d`` and increases ``eps`` until the prediction
changes. Here a *unit* is one image with ``G`` member directions (``G = 1`` for APEM; the
shuffled maps of ``APEM_norm``, thesis section 5.2, form one unit whose answer is the first
``eps`` at which *any* member flips). The grid is ``eps_k = k * step``, ``k = 1..max_steps``.

Three strategies, one interface (STYLE 2):

* :class:`SequentialScan` - the thesis's loop: one ``eps`` per forward pass, unit by unit.
* :class:`BatchedScan` - exact: the same first flipping ``k``, but every forward pass
  evaluates many ``(unit, k)`` pairs (consecutive ``k`` per unit, chunks doubling per unit).
  It never assumes monotonicity, so its answer is the sequential scan's.
* :class:`Bisection` - approximate: exponential growth then bisection, ``O(log max_steps)``
  passes; correct only where the flip is monotone in ``eps``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from handlers.budget import images_per_pass
from handlers.metrics.params import Grid
from handlers.models.derived import inference_logits

NOT_FOUND = 0
"""Search result of a unit that did not flip anywhere on the grid."""


def full_precision() -> contextlib.AbstractContextManager[None]:
    """cuDNN without TF32 and with deterministic algorithms for the block.

    A flip happens where a logit margin crosses zero, so the rounding of the evaluation
    decides near-ties there. TF32 convolutions (on by default on recent GPUs) round to
    10 mantissa bits and differ between batch sizes, which made the batched search and the
    one-image-per-pass scan disagree on GPU; in float32 they agree. No effect on the CPU.
    """
    return torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False
    )


@dataclass
class SearchStats:
    """Work done by a search: forward passes and perturbed images evaluated."""

    forward_passes: int = 0
    evaluations: int = 0


class FlipProblem:
    """Units to search: unit ``u`` perturbs ``images[image_index[u]]`` along ``directions[u]``.

    Args:
        model: pixel-space classifier, already in eval mode.
        images: ``(N, 3, H, W)`` clean images.
        directions: ``(U, G, 3, H, W)`` perturbation directions.
        image_index: ``(U,)`` image of each unit.
        reference: ``(U,)`` class whose change counts as a flip (the clean prediction).
        clip: clip perturbed images to [0, 1] (the thesis does not).
        batch_size: most perturbed images per forward pass (capped by pixels,
            :func:`handlers.budget.images_per_pass`).
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        directions: torch.Tensor,
        image_index: torch.Tensor,
        reference: torch.Tensor,
        clip: bool = False,
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.images = images
        self.directions = directions
        self.image_index = image_index
        self.reference = reference
        self.clip = clip
        self.batch_size = max(images_per_pass(batch_size, images.shape), directions.shape[1])
        self.stats = SearchStats()

    @property
    def units(self) -> int:
        return self.directions.shape[0]

    @property
    def members(self) -> int:
        return self.directions.shape[1]

    def evaluate(self, units: torch.Tensor, ks: torch.Tensor, step: float) -> torch.Tensor:
        """Whether unit ``units[p]`` flips at ``eps = ks[p] * step`` (any member), batched.

        ``units`` and ``ks`` live on the CPU (the search's bookkeeping); the answer too.
        """
        flips = []
        per_pass = max(1, self.batch_size // self.members)
        device = self.images.device
        for start in range(0, units.numel(), per_pass):
            u = units[start : start + per_pass].to(device)
            k = ks[start : start + per_pass].to(device)
            eps = (k.to(self.images.dtype) * step).view(-1, 1, 1, 1, 1)
            x = self.images[self.image_index[u]].unsqueeze(1) + eps * self.directions[u]
            if self.clip:
                x = x.clamp(0.0, 1.0)
            with full_precision():
                logits = inference_logits(self.model, x.flatten(0, 1))
            predictions = logits.argmax(dim=1).view(u.numel(), -1)
            flips.append((predictions != self.reference[u].unsqueeze(1)).any(dim=1).cpu())
            self.stats.forward_passes += 1
            self.stats.evaluations += x.shape[0] * x.shape[1]
        return torch.cat(flips) if flips else torch.zeros(0, dtype=torch.bool)


class FlipSearch(ABC):
    """A strategy that finds, per unit, the first grid index ``k`` with a flip."""

    approximate: ClassVar[bool] = False

    @abstractmethod
    def search(self, problem: FlipProblem, grid: Grid, hints: torch.Tensor | None = None) -> torch.Tensor:
        """``(U,)`` int64: the first flipping ``k`` in ``1..max_steps``, or :data:`NOT_FOUND`.

        ``hints`` (optional, ``(U,)``) are guesses of the answer that a strategy may use to
        size its work; they never change an exact strategy's answer.
        """


class SequentialScan(FlipSearch):
    """Thesis 003, section 3.3, steps 3-7: ``eps = step, 2 step, ...`` one pass at a time."""

    def search(self, problem: FlipProblem, grid: Grid, hints: torch.Tensor | None = None) -> torch.Tensor:
        """Scan each unit's grid in order with one forward pass per ``eps``."""
        result = torch.full((problem.units,), NOT_FOUND, dtype=torch.long)
        for u in range(problem.units):
            unit = torch.tensor([u])
            for k in range(1, grid.max_steps + 1):
                if problem.evaluate(unit, torch.tensor([k]), grid.step)[0]:
                    result[u] = k
                    break
        return result


class BatchedScan(FlipSearch):
    """Exact scan with many ``(unit, eps)`` pairs per forward pass (thesis 003, section 3.3).

    Each unit scans its own grid in order, in chunks of consecutive ``k`` that start at
    ``first_chunk`` (or the unit's hint) and double while no flip is found; the pairs of all
    unfinished units share each forward pass up to ``batch_size`` images. A unit stops at the
    first chunk holding a flip and reports the smallest flipping ``k`` in it, so the answer
    is the sequential scan's; at most the rest of that last chunk is evaluated in vain.
    """

    def __init__(self, first_chunk: int = 16) -> None:
        self.first_chunk = max(1, first_chunk)

    def search(self, problem: FlipProblem, grid: Grid, hints: torch.Tensor | None = None) -> torch.Tensor:
        """Batched exact scan (see the class docstring)."""
        n = problem.units
        budget = max(1, problem.batch_size // problem.members)
        result = torch.full((n,), NOT_FOUND, dtype=torch.long)
        next_k = torch.ones(n, dtype=torch.long)
        chunk = torch.full((n,), self.first_chunk, dtype=torch.long)
        if hints is not None:
            chunk = torch.where(hints > 0, hints.long(), chunk)
        active = torch.arange(n)
        while active.numel():
            want = torch.minimum(chunk[active], grid.max_steps - next_k[active] + 1).clamp(max=budget)
            offset = torch.cumsum(want, 0) - want
            take = (budget - offset).clamp(min=0).minimum(want)
            units = active[take > 0]
            take = take[take > 0]
            pair_units = torch.repeat_interleave(units, take)
            starts = torch.repeat_interleave(torch.cumsum(take, 0) - take, take)
            ks = next_k[pair_units] + torch.arange(pair_units.numel()) - starts
            flipped = problem.evaluate(pair_units, ks, grid.step)
            first = torch.full((n,), grid.max_steps + 1, dtype=torch.long)
            first.scatter_reduce_(0, pair_units, torch.where(flipped, ks, grid.max_steps + 1), "amin")
            found = first[units] <= grid.max_steps
            result[units[found]] = first[units[found]]
            next_k[units] += take
            chunk[units] = torch.minimum(2 * chunk[units], torch.tensor(budget))
            finished = torch.zeros(n, dtype=torch.bool)
            finished[units[found]] = True
            finished[active[next_k[active] > grid.max_steps]] = True
            active = active[~finished[active]]
        return result


class Bisection(FlipSearch):
    """Approximate: ``k = 1, 2, 4, ...`` until a flip, then bisection (one ``k`` per unit per pass).

    Returns a ``k`` that flips while ``k - 1`` does not; it is the first flip only if the
    flip is monotone in ``eps``, hence labelled approximate in every output.
    """

    approximate = True

    def search(self, problem: FlipProblem, grid: Grid, hints: torch.Tensor | None = None) -> torch.Tensor:
        """Exponential search for a bracket ``(lo, hi]``, then bisection inside it."""
        n = problem.units
        result = torch.full((n,), NOT_FOUND, dtype=torch.long)
        lo = torch.zeros(n, dtype=torch.long)  # largest k known not to flip (0: none tried)
        hi = torch.zeros(n, dtype=torch.long)  # smallest k known to flip (0: none yet)
        active = torch.arange(n)
        while active.numel():
            growing = hi[active] == 0
            k = torch.where(
                growing, (2 * lo[active]).clamp(min=1, max=grid.max_steps), (lo[active] + hi[active]) // 2
            )
            flipped = problem.evaluate(active, k, grid.step)
            hi[active[flipped]] = k[flipped]
            lo[active[~flipped]] = k[~flipped]
            exhausted = growing & ~flipped & (k == grid.max_steps)
            bracketed = (hi[active] > 0) & (hi[active] - lo[active] <= 1)
            result[active[bracketed]] = hi[active[bracketed]]
            active = active[~(exhausted | bracketed)]
        return result


SEARCHES: dict[str, type[FlipSearch]] = {
    "exact": BatchedScan,
    "sequential": SequentialScan,
    "approximate": Bisection,
}

"""Searches for the smallest perturbation size on a grid that changes a prediction.

APEM ([doValle2019, ch. 3, fig. 3.1], steps 3-7) perturbs an image as
``x' = x + eps * d`` for a direction ``d`` and increases ``eps`` until the prediction
changes. Here a *unit* is one image with ``G`` member directions (``G = 1`` for APEM; the
shuffled maps of ``APEM_norm`` [doValle2019, §5.2] form one unit whose answer is the first
``eps`` at which *any* member flips). The grid is ``eps_k = k * step``, ``k = 1..max_steps``.

Four strategies, one interface (STYLE 2):

* :class:`SequentialScan` - the thesis's loop: one ``eps`` per forward pass, unit by unit.
* :class:`BatchedScan` - exact: the same first flipping ``k``, but every forward pass
  evaluates many ``(unit, k)`` pairs (consecutive ``k`` per unit, chunks doubling per unit).
  It never assumes monotonicity, so its answer is the sequential scan's.
* :class:`CertifiedScan` - exact: the sequential scan's answer with far fewer evaluations;
  runs of grid points are proven flip-free by margin bounds
  (:mod:`handlers.metrics.line_bounds`) and only the points no proof covers are evaluated.
* :class:`Bisection` - approximate: exponential growth then bisection, ``O(log max_steps)``
  passes; correct only where the flip is monotone in ``eps``.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from handlers.deadline import check_time
from handlers.metrics.line_bounds import LineBounds, line_bounds
from handlers.models.derived import inference_logits, inference_parts
from protocol.budget import images_per_pass
from protocol.params.metrics import Grid

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
    """Work done by a search: forward passes and perturbed images evaluated; passes of the
    margin bounds and the grid points they proved flip-free (:class:`CertifiedScan`)."""

    forward_passes: int = 0
    evaluations: int = 0
    bound_passes: int = 0
    proven_points: int = 0

    def add(self, other: SearchStats) -> None:
        """Add ``other``'s counts to these."""
        self.forward_passes += other.forward_passes
        self.evaluations += other.evaluations
        self.bound_passes += other.bound_passes
        self.proven_points += other.proven_points


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
            :func:`protocol.budget.images_per_pass`).
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
            check_time("the APEM flip search")
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

    @property
    def segments_per_pass(self) -> int:
        """Units per pass of :meth:`certify`: a segment's bounds hold three tensors per member."""
        return max(1, self.batch_size // (3 * self.members))

    @functools.cached_property
    def bounds(self) -> tuple[nn.Module, LineBounds] | None:
        """The model's normalisation and margin bounds; ``None`` where no proof is possible
        (clipped perturbations are not a segment; a layer without a propagation rule)."""
        parts = None if self.clip else inference_parts(self.model, self.images[:1])
        bounds = None if parts is None or not hasattr(parts[0], "std") else line_bounds(parts[1])
        return None if bounds is None else (parts[0], bounds)

    def certify(self, units: torch.Tensor, ks: torch.Tensor, lengths: torch.Tensor, step: float) -> torch.Tensor:
        """A lower bound of the logit margin on the grid points ``ks[p] .. ks[p] + lengths[p]
        - 1`` of unit ``units[p]`` (all members), less the float tolerance: positive proves
        that none of them flips (:meth:`LineBounds.lowest_margins`). Batched.

        Needs :attr:`bounds`. The bounds of a segment cost about five forward passes.
        """
        normalize, bounds = self.bounds  # type: ignore[misc]
        lowest = []
        per_pass = self.segments_per_pass
        device, members = self.images.device, self.members
        for start in range(0, units.numel(), per_pass):
            check_time("the APEM flip search")
            u = units[start : start + per_pass].to(device)
            k, n = ks[start : start + per_pass].to(device), lengths[start : start + per_pass].to(device)
            half = (n - 1).to(self.images.dtype) * (step / 2)
            middle = (k.to(self.images.dtype) * step + half).view(-1, 1, 1, 1, 1)
            directions = self.directions[u]
            with torch.inference_mode(), full_precision():
                middles = normalize((self.images[self.image_index[u]].unsqueeze(1) + middle * directions).flatten(0, 1))
                slopes = (directions / normalize.std.unsqueeze(0)).flatten(0, 1)
                rows = bounds.lowest_margins(
                    middles, slopes, half.repeat_interleave(members), self.reference[u].repeat_interleave(members)
                )
            lowest.append(rows.view(-1, members).amin(dim=1).cpu())
            self.stats.bound_passes += 1
        return torch.cat(lowest) if lowest else torch.zeros(0)


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
    """[doValle2019, §3.3], steps 3-7: ``eps = step, 2 step, ...`` one pass at a time."""

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
    """Exact scan with many ``(unit, eps)`` pairs per forward pass ([doValle2019, §3.3]).

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
            units = _scan_chunks(problem, grid, active, chunk, next_k, result)
            chunk[units] = torch.minimum(2 * chunk[units], torch.tensor(budget))
            active = active[(result[active] == NOT_FOUND) & (next_k[active] <= grid.max_steps)]
        return result


def _scan_chunks(
    problem: FlipProblem, grid: Grid, units: torch.Tensor, chunk: torch.Tensor, next_k: torch.Tensor, result: torch.Tensor
) -> torch.Tensor:
    """One pass over the next ``chunk[u]`` grid points of each unit, in order of ``units``
    until the pass is full (the rest wait for the next call). Records each unit's first flip
    in ``result``, advances ``next_k``; returns the units that were served."""
    budget = max(1, problem.batch_size // problem.members)
    want = torch.minimum(chunk[units], grid.max_steps - next_k[units] + 1).clamp(max=budget)
    take = (budget - (torch.cumsum(want, 0) - want)).clamp(min=0).minimum(want)
    units, take = units[take > 0], take[take > 0]
    pair_units = torch.repeat_interleave(units, take)
    starts = torch.repeat_interleave(torch.cumsum(take, 0) - take, take)
    ks = next_k[pair_units] + torch.arange(pair_units.numel()) - starts
    flipped = problem.evaluate(pair_units, ks, grid.step)
    first = torch.full((problem.units,), grid.max_steps + 1, dtype=torch.long)
    first.scatter_reduce_(0, pair_units, torch.where(flipped, ks, grid.max_steps + 1), "amin")
    found = units[first[units] <= grid.max_steps]
    result[found] = first[found]
    next_k[units] += take
    return units


@dataclass
class _Walk:
    """Per-unit state of :class:`CertifiedScan`."""

    result: torch.Tensor  # first flipping k, or NOT_FOUND
    next_k: torch.Tensor  # every k below it is known not to flip
    run: torch.Tensor  # grid points per proof
    chunk: torch.Tensor  # grid points per evaluation
    evaluate: torch.Tensor  # whether the next points are evaluated rather than proven
    rounds: int = 0
    runs_tried: int = 0
    points_proven: int = 0
    proving: bool = True  # proofs pay for themselves (see CertifiedScan.points_per_run)


class CertifiedScan(FlipSearch):
    """Exact scan that proves runs of grid points flip-free instead of evaluating them.

    Each unit walks its grid in order. It asks :meth:`FlipProblem.certify` for
    ``runs_per_pass`` consecutive runs of ``run`` grid points (up to ``spread`` times as many
    while few units share the pass, which is faster at one image per call and at eight)
    and skips the runs proven before the first unproven one. ``run`` grows by a quarter
    after a round whose runs were all proven (up to ``longest_run``) and halves otherwise;
    once a run of ``shortest_run`` points is not proven, the unit evaluates its next
    ``chunk`` points instead, as :class:`BatchedScan` does. ``chunk`` starts at
    ``shortest_run`` and doubles with every evaluation that finds no flip until a proof
    succeeds again, so a model whose bounds
    rarely prove anything costs about what :class:`BatchedScan` costs plus a proof per
    doubling. A proof bounds every point of its segment, so a proven point cannot flip and
    the answer is the sequential scan's. Where the model has no bounds (clipped
    perturbations, a layer without a propagation rule) the search is :class:`BatchedScan`.

    The first round is a probe of one run per unit; proofs stop for the whole search if it
    proves nothing, or once, after ``rounds_before_judging`` rounds, they have proven fewer
    than ``points_per_run`` grid points per run tried (a unit's runs up to its first
    unproven one; the runs after it are spare rows of a pass that was made anyway): one run
    costs about as much as evaluating that many points (a few forward passes; more where
    the first layer runs at full resolution, as in shapes-vgg), so from
    then on the search is :class:`BatchedScan`'s. Deep networks get there: the radius grows
    by about the ratio of ``|W|`` to ``W`` in every layer.

    The growth of a quarter proves more of the runs it tries than doubling does, in less
    time. The figures behind these choices: benchmarks/results/adversarial.md.
    """

    growth = 1.25
    points_per_run = 8
    rounds_before_judging = 3
    spread = 3

    def __init__(
        self, first_chunk: int = 16, runs_per_pass: int = 2, longest_run: int = 1024, shortest_run: int = 8
    ) -> None:
        self.first_chunk = max(1, first_chunk)
        self.shortest_run = max(1, min(shortest_run, self.first_chunk))
        self.runs_per_pass = max(1, runs_per_pass)
        self.longest_run = max(self.first_chunk, longest_run)

    def search(self, problem: FlipProblem, grid: Grid, hints: torch.Tensor | None = None) -> torch.Tensor:
        """Certified exact scan (see the class docstring). ``hints`` only size the work of
        the fallback: a proof as long as a hinted flip is seldom possible, and on the
        Explanation Filter's rounds (whose hints are the last round's answers) starting from
        ``first_chunk`` was faster than starting from half the hint
        (benchmarks/results/adversarial.md)."""
        if problem.bounds is None:
            return BatchedScan(self.first_chunk).search(problem, grid, hints)
        n = problem.units
        walk = _Walk(
            result=torch.full((n,), NOT_FOUND, dtype=torch.long),
            next_k=torch.ones(n, dtype=torch.long),
            run=torch.full((n,), self.first_chunk, dtype=torch.long),
            chunk=torch.full((n,), self.shortest_run, dtype=torch.long),
            evaluate=torch.zeros(n, dtype=torch.bool),
        )
        active = torch.arange(n)
        while active.numel():
            proving = active[~walk.evaluate[active]] if walk.proving else active[:0]
            if proving.numel():
                self._prove(problem, grid, proving, walk)
                paid = walk.points_proven >= self.points_per_run * walk.runs_tried
                walk.proving = paid or (walk.rounds < self.rounds_before_judging and walk.points_proven > 0)
            scanning = active[walk.evaluate[active]] if walk.proving else active
            if scanning.numel():
                self._scan(problem, grid, scanning, walk)
            active = active[(walk.result[active] == NOT_FOUND) & (walk.next_k[active] <= grid.max_steps)]
        return walk.result

    def _prove(self, problem: FlipProblem, grid: Grid, units: torch.Tensor, walk: _Walk) -> None:
        """One round of proofs: advance past the proven runs, resize ``run``."""
        run = walk.run[units]
        if walk.rounds == 0:  # a probe: one run per unit, so that a model without useful bounds pays little
            runs = 1
        else:
            runs = max(self.runs_per_pass, min(self.spread * self.runs_per_pass, problem.segments_per_pass // units.numel()))
        starts = walk.next_k[units, None] + torch.arange(runs) * run[:, None]
        lengths = torch.minimum(run[:, None], grid.max_steps - starts + 1)
        wanted = lengths > 0
        proven = torch.zeros_like(wanted)
        pair_units = units[:, None].expand_as(starts)[wanted]
        proven[wanted] = problem.certify(pair_units, starts[wanted], lengths[wanted], grid.step) > 0
        prefix = proven.long().cumprod(dim=1)  # proven runs before the first unproven one
        advance = (prefix * lengths.clamp(min=0)).sum(dim=1)
        all_proven = (prefix.bool() | ~wanted).all(dim=1)
        walk.rounds += 1  # runs after a unit's first unproven one are not judged: spare rows
        walk.runs_tried += int(prefix.sum()) + int((~all_proven).sum())
        walk.points_proven += int(advance.sum())
        problem.stats.proven_points += int(advance.sum())
        walk.next_k[units] += advance
        walk.evaluate[units] = ~all_proven & (run <= self.shortest_run)
        walk.chunk[units[advance > 0]] = self.shortest_run
        grown = torch.maximum(run + 1, (run * self.growth).long()).clamp(max=self.longest_run)
        walk.run[units] = torch.where(all_proven, grown, (run // 2).clamp(min=self.shortest_run))

    def _scan(self, problem: FlipProblem, grid: Grid, units: torch.Tensor, walk: _Walk) -> None:
        """Evaluate the next ``chunk`` points of each unit; grow ``chunk``, prove again next."""
        units = _scan_chunks(problem, grid, units, walk.chunk, walk.next_k, walk.result)
        walk.chunk[units] = (2 * walk.chunk[units]).clamp(max=self.longest_run)
        walk.evaluate[units] = False
        walk.run[units] = self.shortest_run


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
    "exact": CertifiedScan,
    "sequential": SequentialScan,
    "approximate": Bisection,
}

"""The Explanation Filter [doValle2019, §3.2, Alg. 2].

Algorithm 2 zeroes the least relevant non-zero value of a relevance map, recomputes APEM,
and repeats until APEM drops below its previous value; it returns the last map before the
drop. Literally, that is one APEM search per distinct value of the map.

:func:`explanation_filter` computes exactly the same map, but scores a batch of candidate
thresholds at once: candidate ``t`` is the map with its ``t`` smallest distinct positive
values zeroed (what the literal loop holds after ``t`` iterations), and the ``2T`` searches
(``eps-`` and ``eps+`` of ``T`` candidates) share forward passes. The first candidate whose
APEM is below its predecessor's ends the filter, as in the literal loop; batches grow
while no drop is found. The tests compare it with Algorithm 2 line by line
(``explanation_filter_literal`` in ``tests/unit/adversarial_helpers.py``).

Under a :func:`~handlers.deadline.time_limit` the filter scores the first candidate alone
(so that a call has progress to show), stops between batches when the next one would not
fit, and, should a batch outrun the estimate, drops that batch; either way it returns the
map it has reached (``stop="time_limit"``): the state of Algorithm 2 after that many
iterations, so filtering that map again continues the same run to the same result (the
filter job does so, one model-server call after another).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from handlers.attacks.base import check_images, device_of, evaluation_mode
from handlers.deadline import TimeLimitExceeded, time_left
from handlers.metrics.apem import (
    ApemParams,
    check_relevance,
    directed,
    loss_gradient_sign,
    search_strategy,
)
from handlers.metrics.flip_search import NOT_FOUND, SEARCHES, FlipProblem, SearchStats
from protocol.budget import images_per_pass
from protocol.params.metrics import FilterParams
from protocol.validation import parse_params

Stop = Literal["apem_dropped", "map_exhausted", "time_limit"]


@dataclass(frozen=True)
class FilterOutcome:
    """Result of the Explanation Filter on one map.

    Attributes:
        filtered: the map returned by Algorithm 2, same shape as the input map.
        apem_before: APEM of the input map (after quantisation, if any).
        apem_after: APEM of ``filtered`` (never below ``apem_before``).
        fraction_kept: non-zero values of ``filtered`` over non-zero values of the input.
        values_removed: distinct values zeroed (iterations of Algorithm 2 kept).
        candidates_scored: candidate maps whose APEM was computed.
        stop: ``"apem_dropped"``, ``"map_exhausted"`` (no positive value left) or
            ``"time_limit"`` (the call's time ran out: ``filtered`` is where Algorithm 2 had
            got to, and filtering it again goes on from there).
        distinct_values: distinct positive values of the input map (after quantisation).
        stats: forward passes and evaluations of the APEM searches.
        approximate: whether the APEM searches were approximate.
    """

    filtered: torch.Tensor
    apem_before: float
    apem_after: float
    fraction_kept: float
    values_removed: int
    candidates_scored: int
    stop: Stop
    stats: SearchStats
    approximate: bool
    distinct_values: int

    def summary(self) -> dict[str, Any]:
        """JSON-friendly fields of the contract's ``FilterResult`` (without the map)."""
        return {
            "apem_before": self.apem_before,
            "apem_after": self.apem_after,
            "fraction_kept": self.fraction_kept,
            "values_removed": self.values_removed,
            "candidates_scored": self.candidates_scored,
            "stop": self.stop,
            "approximate": self.approximate,
            "distinct_values": self.distinct_values,
        }


def quantise(relevance: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Round a [0, 1] map to ``levels`` evenly spaced values (identity for ``None``)."""
    if levels is None:
        return relevance
    return torch.round(relevance * (levels - 1)) / (levels - 1)


def fraction_kept(before: torch.Tensor, after: torch.Tensor) -> float:
    """Non-zero values of ``after`` over non-zero values of ``before`` (1 for an empty map)."""
    nonzero = int((before > 0).sum())
    return 1.0 if nonzero == 0 else int((after > 0).sum()) / nonzero


class _CandidateScorer:
    """APEM [doValle2019, ch. 3] of many candidate maps of one image per batched search."""

    def __init__(self, model: nn.Module, image: torch.Tensor, target: int | None, params: ApemParams):
        self.model, self.image, self.params = model, image, params
        with torch.no_grad():
            self.prediction = model(image).argmax(dim=1)
        y = self.prediction if target is None else torch.tensor([target], device=image.device)
        self.sign = loss_gradient_sign(model, image, y)
        self.stats = SearchStats()
        self.hints: torch.Tensor | None = None

    def score(self, maps: torch.Tensor) -> np.ndarray:
        """Per-candidate ``eps+ - eps-`` (caps for sizes not found) of ``(T, C, H, W)`` maps."""
        t = maps.shape[0]
        units = torch.cat([directed(maps, self.sign), directed(1.0 - maps, self.sign)]).unsqueeze(1)
        index = torch.zeros(2 * t, dtype=torch.long, device=self.image.device)
        problem = FlipProblem(
            self.model, self.image, units, index, self.prediction[index], self.params.clip, self.params.batch_size
        )
        hints = None if self.hints is None else self.hints.repeat_interleave(t)
        found = search_strategy(self.params).search(problem, self.params.grid, hints)
        self.hints = torch.stack([found[t - 1], found[-1]])
        self.stats.add(problem.stats)
        sizes = torch.where(found == NOT_FOUND, self.params.max_steps + 1, found).double() * self.params.step
        return (sizes[t:] - sizes[:t]).cpu().numpy()


def explanation_filter(
    model: nn.Module,
    image: torch.Tensor,
    relevance: torch.Tensor,
    target: int | None = None,
    apem_params: dict[str, Any] | ApemParams | None = None,
    params: dict[str, Any] | FilterParams | None = None,
) -> FilterOutcome:
    """[doValle2019, Alg. 2] with candidate thresholds scored in batches.

    Args:
        model: pixel-space classifier.
        image: ``(3, H, W)`` in [0, 1].
        relevance: ``([1 or 3,] H, W)`` map in [0, 1] explaining ``target``.
        target: explained class (default: the prediction).
        apem_params: :class:`~handlers.metrics.apem.ApemParams` of every APEM computed.
        params: :class:`FilterParams`.

    Returns:
        :class:`FilterOutcome`; ``filtered`` equals the literal algorithm's map.
    """
    ap, fp = parse_params(ApemParams, apem_params), parse_params(FilterParams, params)
    with evaluation_mode(model):
        x = check_images(image.unsqueeze(0)).to(device_of(model))
        original = check_relevance(relevance.unsqueeze(0), x)[0]
        current = quantise(original, fp.levels)
        values = torch.unique(current[current > 0])  # ascending: candidate t zeroes values[:t]
        began = time.monotonic()
        scorer = _CandidateScorer(model, x, target, ap)
        best_apem = float(scorer.score(current.unsqueeze(0))[0])
        most = images_per_pass(fp.max_candidates_per_batch, x.shape)  # three maps' worth each
        before, start, size, scored = best_apem, 0, min(fp.candidates_per_batch, most), 1

        def finish(stop: Stop) -> FilterOutcome:
            """The outcome at the state Algorithm 2 has reached (``current`` after ``start``
            iterations)."""
            return _outcome(original, current.reshape(relevance.shape), best_apem, start, scored, stop,
                            before=before, distinct=values.numel(), scorer=scorer, params=ap)

        while start < values.numel():
            fits = _candidates_that_fit((time.monotonic() - began) / scored)
            securing = fits is not None and start == 0  # one candidate first: progress to return
            if fits == 0 and not securing:  # the time is up: return the state reached so far
                return finish("time_limit")
            batch = 1 if securing else size if fits is None else min(size, fits)
            thresholds = values[start : start + batch]
            maps = torch.where(current.unsqueeze(0) <= thresholds.view(-1, 1, 1, 1), 0.0, current)
            try:
                scores = scorer.score(maps)
            except TimeLimitExceeded:  # the batch outran the estimate: keep what earlier ones reached
                if start == 0:
                    raise
                return finish("time_limit")
            scored += len(scores)
            drops = np.flatnonzero(scores < np.concatenate([[best_apem], scores[:-1]]))
            kept = len(scores) if drops.size == 0 else int(drops[0])
            if kept:
                best_apem = float(scores[kept - 1])
                current = maps[kept - 1]
                start += kept
            if drops.size:
                return finish("apem_dropped")
            if not securing:
                size = min(2 * batch, most)
    return finish("map_exhausted")


def _candidates_that_fit(seconds_per_candidate: float) -> int | None:
    """Candidates the current time limit leaves room for (with a fifth to spare); ``None``
    without a limit."""
    left = time_left()
    if left is None:
        return None
    return max(0, int(0.8 * left / max(seconds_per_candidate, 1e-9)))


def _outcome(
    original: torch.Tensor,
    filtered: torch.Tensor,
    after: float,
    removed: int,
    scored: int,
    stop: Stop,
    *,
    before: float,
    distinct: int,
    scorer: _CandidateScorer,
    params: ApemParams,
) -> FilterOutcome:
    return FilterOutcome(
        filtered=filtered.cpu(),
        apem_before=before,
        apem_after=after,
        fraction_kept=fraction_kept(original, filtered),
        values_removed=removed,
        candidates_scored=scored,
        stop=stop,
        stats=scorer.stats,
        approximate=SEARCHES[params.search].approximate,
        distinct_values=distinct,
    )

"""Explanation Filter: the batched filter returns the literal Algorithm 2's map."""

from __future__ import annotations

import pytest
import torch

from handlers.metrics.explanation_filter import (
    explanation_filter,
    quantise,
)
from protocol.validation import InvalidParameter
from tests.unit.adversarial_helpers import (
    assert_unchanged,
    explanation_filter_literal,
    images,
    snapshot,
    tiny_cnn,
)

APEM = {"step": 0.25, "max_steps": 120}


def _map(seed: int, channels: int, levels: int = 8) -> torch.Tensor:
    """A 16x16 map with few distinct values (``levels`` steps of 1/levels, zeros included)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels + 1, (channels, 16, 16), generator=generator).double() / levels
    return values[0] if channels == 1 else values


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("channels", "batch"), [(1, 1), (1, 3), (3, 2)])
def test_batched_filter_equals_the_literal_algorithm(seed: int, channels: int, batch: int) -> None:
    model, image = tiny_cnn(seed=seed), images(1, size=16, seed=seed)[0]
    relevance = _map(seed, channels)
    before = snapshot(model)
    fast = explanation_filter(model, image, relevance, apem_params=APEM, params={"candidates_per_batch": batch})
    literal = explanation_filter_literal(model, image, relevance, apem_params=APEM)
    assert_unchanged(model, before)
    assert torch.equal(fast.filtered, literal.filtered) and fast.filtered.shape == relevance.shape
    assert fast.apem_before == literal.apem_before and fast.apem_after == literal.apem_after
    assert fast.values_removed == literal.values_removed and fast.stop == literal.stop
    assert fast.fraction_kept == pytest.approx(literal.fraction_kept)
    assert fast.apem_after >= fast.apem_before
    kept = int((fast.filtered > 0).sum()) / int((relevance > 0).sum())
    assert fast.fraction_kept == pytest.approx(kept)
    # what was removed is exactly the smallest distinct values
    removed = torch.unique(relevance[relevance > 0])[: fast.values_removed]
    assert torch.equal(fast.filtered, torch.where(torch.isin(relevance, removed), 0.0, relevance))


def test_filter_removes_values_and_summarises() -> None:
    """Across the seeds above at least one map loses values before APEM drops."""
    removed = []
    for seed in range(4):
        model, image = tiny_cnn(seed=seed), images(1, size=16, seed=seed)[0]
        outcome = explanation_filter(model, image, _map(seed, 1), apem_params=APEM)
        removed.append(outcome.values_removed)
        assert set(outcome.summary()) >= {"apem_before", "apem_after", "fraction_kept"}
    assert max(removed) > 0


def test_quantisation_bounds_the_distinct_values() -> None:
    r = torch.rand(16, 16, dtype=torch.float64)
    assert torch.unique(quantise(r, 5)).numel() <= 5
    assert torch.equal(quantise(r, None), r)


def test_bad_parameters() -> None:
    model, image = tiny_cnn(), images(1, size=16)[0]
    with pytest.raises(InvalidParameter) as info:
        explanation_filter(model, image, _map(0, 1), params={"levels": 1})
    assert info.value.param == "levels"
    with pytest.raises(InvalidParameter, match="relevance"):
        explanation_filter(model, image, _map(0, 1) + 1)


def test_works_under_an_outer_inference_mode() -> None:
    model, image = tiny_cnn(seed=1), images(1, size=16, seed=1)[0]
    expected = explanation_filter(model, image, _map(1, 1), apem_params=APEM)
    with torch.inference_mode():
        inside = explanation_filter(model, image.clone(), _map(1, 1), apem_params=APEM)
    assert torch.equal(inside.filtered, expected.filtered)


def test_a_filter_stopped_by_its_time_limit_resumes_to_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of time after its first batch, the filter returns the map it reached; filtering
    that map again ends where the uninterrupted run ends (the filter job's resumption)."""
    from handlers.metrics import explanation_filter as module

    seed = max(range(4), key=lambda s: explanation_filter(tiny_cnn(seed=s), images(1, size=16, seed=s)[0], _map(s, 1), apem_params=APEM).values_removed)
    model, image, relevance = tiny_cnn(seed=seed), images(1, size=16, seed=seed)[0], _map(seed, 1)
    params = {"candidates_per_batch": 1}
    whole = explanation_filter(model, image, relevance, apem_params=APEM, params=params)
    assert whole.values_removed >= 2 and whole.stop != "time_limit"
    answers = iter([1e9])  # room for the first batch, then none
    monkeypatch.setattr(module, "time_left", lambda: next(answers, 0.0))
    first = explanation_filter(model, image, relevance, apem_params=APEM, params=params)
    assert first.stop == "time_limit" and first.values_removed == 1
    assert first.distinct_values == whole.distinct_values
    monkeypatch.setattr(module, "time_left", lambda: None)
    rest = explanation_filter(model, image, first.filtered, apem_params=APEM, params=params)
    assert torch.equal(rest.filtered, whole.filtered) and rest.stop == whole.stop
    assert rest.apem_before == first.apem_after and rest.apem_after == whole.apem_after
    assert first.values_removed + rest.values_removed == whole.values_removed
    assert first.fraction_kept * rest.fraction_kept == pytest.approx(whole.fraction_kept)


def test_a_batch_that_outruns_the_time_limit_gives_back_the_state_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a limit the first candidate is scored alone; a later batch whose search runs out
    of time is dropped and the reached map returned; out of time before any progress, the
    call fails."""
    from handlers.deadline import TimeLimitExceeded, time_limit
    from handlers.metrics import explanation_filter as module

    model, image, relevance = tiny_cnn(seed=0), images(1, size=16, seed=0)[0], _map(0, 1)
    whole = explanation_filter(model, image, relevance, apem_params=APEM)
    assert whole.values_removed >= 2
    score = module._CandidateScorer.score
    batches: list[int] = []

    def out_of_time_at(call: int):
        def scoring(self, maps: torch.Tensor):
            batches.append(maps.shape[0])
            if len(batches) == call:
                raise TimeLimitExceeded("the APEM flip search did not finish")
            return score(self, maps)
        return scoring

    monkeypatch.setattr(module._CandidateScorer, "score", out_of_time_at(3))
    with time_limit(1e6):
        reached = explanation_filter(model, image, relevance, apem_params=APEM)
    assert batches[:2] == [1, 1] and batches[2] > 1  # the initial map, one candidate, then a batch
    assert reached.stop == "time_limit" and reached.values_removed == 1
    assert torch.equal(reached.filtered, torch.where(relevance == relevance[relevance > 0].min(), 0.0, relevance))
    batches.clear()
    monkeypatch.setattr(module._CandidateScorer, "score", out_of_time_at(2))
    with time_limit(1e6), pytest.raises(TimeLimitExceeded):
        explanation_filter(model, image, relevance, apem_params=APEM)

"""A client's batch_size is capped by pixels per pass, and the cap changes no answer."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from handlers.explainers import explain
from handlers.metrics.apem import apem
from protocol import budget
from protocol.budget import MAX_PIXELS_PER_PASS, images_per_pass
from tests.unit.explainers.conftest import make_classifier, make_images


def test_images_per_pass() -> None:
    assert images_per_pass(4096, (3, 224, 224)) == 256
    assert images_per_pass(4096, (8, 3, 64, 64)) == MAX_PIXELS_PER_PASS // (64 * 64) == 3136
    assert images_per_pass(16, (3, 224, 224)) == 16
    assert images_per_pass(4096, (3, 100_000, 100_000)) == 1


def _largest_pass(run) -> int:  # type: ignore[no-untyped-def]
    """The most images one model pass held while ``run()`` ran: the largest batch any
    convolution saw, whether of the served network or of its fused inference copy."""
    seen: list[int] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, torch.nn.Conv2d):
            seen.append(args[0].shape[0])

    handle = register_module_forward_pre_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return max(seen)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("smoothgrad", {"n": 12, "batch_size": 4096}),
        ("integrated_gradients", {"steps": 12, "batch_size": 4096}),
        ("lime", {"n": 40, "batch_size": 4096, "n_segments": 8, "num_features": 2}),
    ],
)
def test_the_cap_bounds_every_pass_and_changes_no_answer(
    monkeypatch: pytest.MonkeyPatch, method: str, params: dict
) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images(2)  # 16x16 images
    uncapped = explain(model, images, method, params).relevance
    bound = 5 + 2 * images.shape[0]  # five images per pass; IG adds both path ends to its first
    assert _largest_pass(lambda: explain(model, images, method, params)) > bound
    monkeypatch.setattr(budget, "MAX_PIXELS_PER_PASS", 5 * 16 * 16)
    assert _largest_pass(lambda: explain(model, images, method, params)) <= bound
    capped = explain(model, images, method, params).relevance
    torch.testing.assert_close(capped, uncapped, rtol=1e-4, atol=1e-6)


def test_apem_search_passes_are_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images(2)
    maps = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    params = {"step": 0.5, "max_steps": 60, "batch_size": 4096}
    uncapped = apem(model, images, maps, params=params)
    assert _largest_pass(lambda: apem(model, images, maps, params=params)) > 7
    monkeypatch.setattr(budget, "MAX_PIXELS_PER_PASS", 7 * 16 * 16)
    assert _largest_pass(lambda: apem(model, images, maps, params=params)) <= 7
    capped = apem(model, images, maps, params=params)
    assert (capped.eps_minus, capped.eps_plus) == (uncapped.eps_minus, uncapped.eps_plus)


def test_filter_candidate_batches_are_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from handlers.metrics import explanation_filter as ef

    torch.set_num_threads(1)
    model, images = make_classifier(), make_images(1)
    relevance = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))
    apem_params = {"step": 0.5, "max_steps": 40}
    params = {"levels": 64, "candidates_per_batch": 4096, "max_candidates_per_batch": 4096}
    sizes: list[int] = []
    score = ef._CandidateScorer.score
    monkeypatch.setattr(
        ef._CandidateScorer,
        "score",
        lambda self, maps: sizes.append(len(maps)) or score(self, maps),
    )
    uncapped = ef.explanation_filter(model, images[0], relevance, None, apem_params, params)
    assert max(sizes) > 3
    sizes.clear()
    monkeypatch.setattr(budget, "MAX_PIXELS_PER_PASS", 3 * 16 * 16)
    capped = ef.explanation_filter(model, images[0], relevance, None, apem_params, params)
    assert max(sizes) <= 3
    assert torch.equal(capped.filtered, uncapped.filtered)
    assert capped.apem_after == uncapped.apem_after

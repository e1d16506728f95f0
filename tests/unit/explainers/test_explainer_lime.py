"""LIME on a model with a known linear answer, and its pieces against slow references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import pairwise_distances
from torch import nn

from handlers.explainers import explain
from handlers.explainers.lime import Lime, kernel_weights, segment
from protocol.params.explainers import LimeParams
from tests.unit.explainers.conftest import make_classifier, make_images


class LeftHalfRed(nn.Module):
    """Class 1's logit is 10 x the mean red value of the left half; class 0's is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        score = 10 * x[:, 0, :, :half].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 24, 24, generator=generator) * 0.2
    image[:, 0, 3:12, 2:9] = 0.9  # red patch on the left
    image[:, 1, 12:20, 14:22] = 0.9  # green patch on the right
    return image


def _analytic_weights(image: torch.Tensor, segments: np.ndarray) -> np.ndarray:
    """With hidden superpixels at 0 the logit is Σ_s z_s · (10 / N_left) Σ_{p in s, left} red(p)."""
    red = image[0, 0].double().numpy()
    left = np.zeros_like(red, dtype=bool)
    left[:, : red.shape[1] // 2] = True
    contribution = np.zeros(segments.max() + 1)
    np.add.at(contribution, segments[left], red[left])
    return 10 * contribution / left.sum()


def test_recovers_the_exact_linear_model() -> None:
    torch.set_num_threads(1)
    image = _image()
    base = {"n": 600, "n_segments": 12, "hide_color": 0.0, "output": "logit", "alpha": 1e-8}
    segments = segment(image[0], LimeParams(**base))
    num = int(segments.max()) + 1
    result = explain(LeftHalfRed(), image, "lime", {**base, "num_features": num}, torch.tensor([1]))
    weights = np.array(result.extras["weights"][0])
    np.testing.assert_allclose(weights, _analytic_weights(image, segments), atol=1e-5)
    assert result.extras["score"][0] == pytest.approx(1.0, abs=1e-8)
    np.testing.assert_array_equal(result.extras["segments"][0], segments)
    pixel_map = result.relevance[0].sum(0).double().numpy()
    np.testing.assert_allclose(pixel_map, weights[segments], atol=1e-6)


def test_lasso_path_keeps_the_k_most_relevant_superpixels() -> None:
    torch.set_num_threads(1)
    image = _image()
    params = {"n": 600, "n_segments": 12, "hide_color": 0.0, "output": "logit", "num_features": 3}
    result = explain(LeftHalfRed(), image, "lime", params, torch.tensor([1]))
    weights = np.array(result.extras["weights"][0])
    expected = _analytic_weights(image, result.extras["segments"][0])
    assert np.count_nonzero(weights) == 3
    assert set(np.flatnonzero(weights)) == set(np.argsort(-expected)[:3])


def _slow_scores(model, image, target, segments, samples, fill) -> np.ndarray:
    """One perturbed image at a time, pixel by pixel (what lime_image's loop does)."""
    out = []
    for row in samples:
        perturbed = image.clone()
        for s in np.flatnonzero(row == 0):
            perturbed[:, segments == s] = fill[:, segments == s]
        with torch.no_grad():
            out.append(model(perturbed[None]).softmax(1)[0, target].item())
    return np.array(out)


@pytest.mark.parametrize("hide_color", ["mean", 0.5])
def test_batched_perturbations_equal_a_slow_loop(hide_color: str | float) -> None:
    torch.set_num_threads(1)
    model, image = make_classifier(), make_images(1)[0]
    explainer = Lime({"n": 20, "n_segments": 8, "batch_size": 7, "hide_color": hide_color})
    segments = segment(image, explainer.params)
    generator = torch.Generator().manual_seed(3)
    samples = torch.randint(0, 2, (20, int(segments.max()) + 1), generator=generator, dtype=torch.uint8)
    fast = explainer._score(model, image, 2, torch.as_tensor(segments), samples)
    seg = torch.as_tensor(segments)
    fill = torch.full_like(image, 0.5)
    for s in range(int(segments.max()) + 1):
        if hide_color == "mean":
            fill[:, seg == s] = image[:, seg == s].mean(dim=1, keepdim=True)
    slow = _slow_scores(model, image, 2, seg, samples.numpy(), fill)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-7)


def test_kernel_is_paper_equation_5_on_the_cosine_distance() -> None:
    samples = np.random.default_rng(0).integers(0, 2, (50, 9)).astype(float)
    samples[0] = 1
    distance = pairwise_distances(samples, np.ones((1, 9)), metric="cosine").ravel()
    np.testing.assert_allclose(kernel_weights(samples, 0.25), np.exp(-(distance**2) / 0.25**2), atol=1e-12)


def test_seeded_and_reported() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images(2)
    params = {"n": 40, "n_segments": 8, "num_features": 3}
    one = explain(model, images, "lime", params)
    again = explain(model, images, "lime", params)
    other = explain(model, images, "lime", {**params, "seed": 1})
    assert torch.equal(one.relevance, again.relevance)
    assert not torch.equal(one.relevance, other.relevance)
    assert one.extras["segments"].shape == (2, 16, 16) and one.extras["segments"].dtype == np.int32
    assert [len(w) for w in one.extras["weights"]] == one.extras["num_superpixels"]
    assert all(np.count_nonzero(w) <= 3 for w in one.extras["weights"])
    assert one.params["alpha"] == 1.0 and one.params["kernel_width"] == 0.25

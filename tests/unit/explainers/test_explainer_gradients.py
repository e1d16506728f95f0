"""Gradient, SmoothGrad, Integrated Gradients, Grad-CAM and NAM against slow references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import LayerAttribution, LayerGradCam, Saliency

from handlers.explainers import explain
from tests.unit.explainers.conftest import make_classifier, make_images


@pytest.mark.parametrize("architecture", ["shapes_resnet", "shapes_vgg"])
def test_gradient_equals_captum_saliency_without_abs(architecture: str) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(architecture), make_images(3)
    targets = torch.tensor([0, 2, 3])
    ours = explain(model, images, "gradient", targets=targets).relevance
    reference = Saliency(model).attribute(images.clone(), target=targets, abs=False)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_gradient_equals_the_jacobian_row_in_float64() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(dtype=torch.float64), make_images(2, dtype=torch.float64)
    ours = explain(model, images, "gradient", targets=torch.tensor([1, 3])).relevance
    for b, t in enumerate([1, 3]):
        jacobian = torch.autograd.functional.jacobian(lambda x: model(x[None])[0], images[b])
        torch.testing.assert_close(ours[b].double(), jacobian[t], rtol=1e-5, atol=1e-7)


def _smoothgrad_loop(model, images, targets, n, sigma, seed) -> torch.Tensor:
    """One noisy image at a time, the noise drawn in the documented order."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.randn((min(16, n - k), *images.shape), generator=generator, dtype=images.dtype)
              for k in range(0, n, 16)]
    noises = list(torch.cat(blocks))
    total = torch.zeros_like(images)
    for b in range(len(images)):
        std = sigma * (images[b].max() - images[b].min())
        for k in range(n):
            x = (images[b] + std * noises[k][b]).unsqueeze(0).requires_grad_(True)
            (grad,) = torch.autograd.grad(model(x)[0, targets[b]], x)
            total[b] += grad[0]
    return total / n


@pytest.mark.parametrize("batch_size", [1, 6, 14, 64])
def test_smoothgrad_matches_a_plain_loop_over_the_same_noise(batch_size: int) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(dtype=torch.float64), make_images(2, dtype=torch.float64)
    targets = torch.tensor([2, 1])
    params = {"n": 37, "sigma": 0.15, "seed": 5, "batch_size": batch_size}
    ours = explain(model, images, "smoothgrad", params, targets).relevance
    reference = _smoothgrad_loop(model, images, targets, n=37, sigma=0.15, seed=5)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-9)


def test_smoothgrad_seed_and_zero_noise() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images()
    one = explain(model, images, "smoothgrad", {"n": 4, "seed": 1}).relevance
    two = explain(model, images, "smoothgrad", {"n": 4, "seed": 2}).relevance
    assert not torch.allclose(one, two)
    flat = explain(model, images, "smoothgrad", {"n": 3, "sigma": 0.0}).relevance
    torch.testing.assert_close(flat, explain(model, images, "gradient").relevance, rtol=1e-5, atol=1e-7)


def test_smoothgrad_wraps_other_explainers() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images()
    params = {"n": 2, "sigma": 0.0, "base": "lrp", "base_params": {"epsilon": 0.5}}
    result = explain(model, images, "smoothgrad", params)
    assert result.params["base_params"] == {"rule": "epsilon", "epsilon": 0.5, "alpha": None, "beta": None, "book_absorbed": False}
    lrp = explain(model, images, "lrp", {"epsilon": 0.5}).relevance
    torch.testing.assert_close(result.relevance, lrp, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
def test_integrated_gradients_equals_captum(method: str) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(dtype=torch.float64), make_images(2, dtype=torch.float64)
    targets = torch.tensor([0, 3])
    params = {"steps": 12, "baseline": 0.25, "method": method, "batch_size": 10}
    ours = explain(model, images, "integrated_gradients", params, targets).relevance
    reference = CaptumIG(model).attribute(
        images, baselines=0.25, target=targets, n_steps=12, method=method
    )
    if method == "riemann_trapezoid":
        # captum's trapezoid weights are 1/n with halved ends (they sum to (n-1)/n); the
        # trapezoid rule on n nodes spaced 1/(n-1) apart uses 1/(n-1): ours = captum * n/(n-1)
        reference = reference * 12 / 11
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-8)


def test_integrated_gradients_completeness() -> None:
    """Σ IG = F(x) - F(x') [Sundararajan2017, eq. 3], up to the quadrature error.

    A random ReLU network has a kinked integrand, so convergence is slow: measured gaps at
    256 nodes are about 2-3% of F(x) - F(x') on these images.
    """
    torch.set_num_threads(1)
    model, images = make_classifier(dtype=torch.float64), make_images(2, dtype=torch.float64)
    result = explain(model, images, "integrated_gradients", {"steps": 256, "batch_size": 128})
    with torch.no_grad():
        logits = model(images).gather(1, result.targets[:, None])[:, 0]
        baseline = model(torch.zeros_like(images)).gather(1, result.targets[:, None])[:, 0]
    expected = logits - baseline
    total = result.relevance.double().sum((1, 2, 3))
    gap = torch.tensor(result.extras["completeness_gap"], dtype=torch.float64)
    torch.testing.assert_close(gap, total - expected, rtol=1e-4, atol=1e-7)
    assert (gap.abs() < 0.05 * expected.abs()).all()


@pytest.mark.parametrize("architecture", ["shapes_resnet", "shapes_vgg"])
def test_gradcam_equals_captum_layer_gradcam(architecture: str) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(architecture), make_images(2)
    targets = torch.tensor([1, 2])
    ours = explain(model, images, "gradcam", targets=targets).relevance
    cam = LayerGradCam(model, model.features).attribute(images, target=targets, relu_attributions=True)
    reference = LayerAttribution.interpolate(cam, images.shape[-2:], interpolate_mode="bilinear")
    torch.testing.assert_close(ours.sum(1), reference[:, 0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[:, 0], ours[:, 2])


def test_nam_is_the_normalised_resized_feature_map_of_the_most_important_feature() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier("shapes_resnet"), make_images(2)
    result = explain(model, images, "nam", targets=torch.tensor([3, 0]))
    with torch.no_grad():
        activations = model.feature_map(images)
        importance = activations.mean((2, 3)) * model.head[-1].weight[[3, 0]]  # [Singla2022, §3.2]
    assert result.extras["feature"] == importance.argmax(1).tolist()
    for b, k in enumerate(result.extras["feature"]):
        a = activations[b, k]
        expected = F.interpolate(((a - a.min()) / (a.max() - a.min()))[None, None], size=(16, 16),
                                 mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(result.relevance[b].sum(0), expected, rtol=1e-5, atol=1e-6)
    live = int(activations.amax((2, 3)).amin(0).argmax())  # a feature active in both images
    chosen = explain(model, images, "nam", {"feature": live})
    assert chosen.extras["feature"] == [live, live]
    maps = chosen.relevance.sum(1)
    assert maps.min() >= 0 and maps.amax((1, 2)).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)

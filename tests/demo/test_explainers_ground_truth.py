"""Explainers on the trained demo models: references, conservation and ground truth.

Measured on the first 24 test images (2 CPU threads), over training seeds 0-2
(``docs/seeds.md``; the shipped weights are seed 0):

* fair model, share of relevance mass inside the core (object) mask, whose own share of
  the image is 0.131: gradient 0.27-0.33, SmoothGrad (n=50) 0.20-0.26, LRP-epsilon
  0.73-0.82, LIME (n=500, positive weights) 0.78-0.80, above the mask's share on at least
  80 % of the images.
* shapes-resnet on planted-class images on their planted background (the background is
  0.862 of the image), share of relevance on the background, biased model vs fair model
  (vs the biased model on the same shapes with the background swapped): LRP-epsilon
  0.32-0.47 vs 0.16-0.26 (0.18-0.29), LIME 0.33-0.39 vs 0.17-0.21 (0.10-0.14), Grad-CAM
  0.79-0.84 vs 0.59-0.66 (0.41-0.58). Gradient and SmoothGrad do not show the shift:
  their mass follows the background texture for any model.
* Randomised weights [Adebayo2018]: Spearman correlation of the signed gradient
  with the trained model's, mean -0.002-0.005; of |gradient| summed over channels (stage 2)
  0.20-0.25, the image structure every ReLU network's gradient keeps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from zennit.attribution import Gradient as ZennitGradient
from zennit.composites import LayerMapComposite
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.types import Activation, AvgPool, Convolution, Linear

from handlers.explainers import explain
from handlers.models.architectures import build_architecture
from handlers.models.classifier import PixelClassifier
from model_store.shapes import BACKGROUNDS, ShapesConfig, render

N_IMAGES = 24
PLANTED = ShapesConfig().planted_backgrounds


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _share(mass: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    """Per image: relevance mass inside the mask over all relevance mass."""
    inside = (mass * torch.from_numpy(masks)).sum((1, 2))
    return (inside / mass.sum((1, 2)).clamp(min=1e-12)).numpy()


def _mass(name: str, relevance: torch.Tensor) -> torch.Tensor:
    """|R| summed over channels; LIME and Grad-CAM: the positive evidence only."""
    if name in ("lime", "gradcam"):
        return relevance.sum(1).clamp(min=0)
    return relevance.abs().sum(1)


@pytest.fixture(scope="module")
def fair_images(shapes_split):
    split = shapes_split("fair", "test").subset(np.arange(N_IMAGES))
    return _tensor(split.images), torch.from_numpy(split.labels), split


@pytest.fixture(scope="module")
def planted_images(shapes_split):
    split = shapes_split("spurious", "test")
    keep = [i for i, a in enumerate(split.attributes) if a["planted_background"]][:N_IMAGES]
    sub = split.subset(keep)
    free = [k for k in BACKGROUNDS if k not in PLANTED.values()]
    swapped = [render({**a, "background": free[int(a["index"]) % len(free)]}, 64)[0] for a in sub.attributes]
    return _tensor(sub.images), _tensor(np.stack(swapped)), torch.from_numpy(sub.labels), sub


CORE_METHODS = [
    ("gradient", {}, 1.7),
    ("smoothgrad", {"n": 50}, 1.4),
    ("lrp", {}, 4.0),
    ("lime", {"n": 500}, 4.0),
]


@pytest.mark.parametrize(("name", "params", "factor"), CORE_METHODS)
def test_relevance_concentrates_on_the_object_for_the_fair_model(name, params, factor, demo_model, fair_images, record_property) -> None:
    torch.set_num_threads(2)
    model, _ = demo_model("shapes-resnet-fair")
    images, labels, split = fair_images
    result = explain(model, images, name, params, labels)
    shares = _share(_mass(name, result.relevance), split.core_masks)
    mask_share = split.core_masks.mean((1, 2))
    record_property("core_share", float(shares.mean()))
    record_property("core_share_over_mask_share", float(shares.mean() / mask_share.mean()))
    record_property("images_above_the_mask_share", float((shares > mask_share).mean()))
    measured = f"{name}: core share {shares.mean():.3f} (mask {mask_share.mean():.3f})"
    assert (shares > mask_share).mean() >= 0.8, measured
    assert shares.mean() >= factor * mask_share.mean(), measured


@pytest.mark.parametrize(("name", "params"), [("lrp", {}), ("lime", {"n": 500}), ("gradcam", {})])
def test_relevance_shifts_to_the_planted_background(name, params, demo_model, planted_images, record_property) -> None:
    torch.set_num_threads(2)
    images, swapped, labels, split = planted_images
    biased, _ = demo_model("shapes-resnet")
    fair, _ = demo_model("shapes-resnet-fair")
    background = split.spurious_masks
    on_biased = _share(_mass(name, explain(biased, images, name, params, labels).relevance), background).mean()
    on_fair = _share(_mass(name, explain(fair, images, name, params, labels).relevance), background).mean()
    on_swapped = _share(_mass(name, explain(biased, swapped, name, params, labels).relevance), background).mean()
    for key, value in (("background_share_biased", on_biased), ("background_share_fair", on_fair),
                       ("background_share_swapped", on_swapped)):
        record_property(key, float(value))
    measured = f"{name}: background share biased {on_biased:.3f}, fair {on_fair:.3f}, swapped {on_swapped:.3f}"
    assert on_biased >= on_fair + 0.1, measured
    assert on_biased >= on_swapped + 0.1, measured


def _zennit_epsilon(model: PixelClassifier, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    inputs = model.normalize(images).detach().requires_grad_(True)
    layer_map = [(Activation, Pass()), (Sum, Norm()), (AvgPool, Norm()), (Convolution, Epsilon(1.0)), (Linear, Epsilon(1.0))]
    with ZennitGradient(model.network, LayerMapComposite(layer_map)) as attributor:
        logits = model.network(inputs).detach()
        output = torch.zeros_like(logits)
        output[range(len(targets)), targets] = logits[range(len(targets)), targets]
        return attributor(inputs, output)[1]


def test_lrp_matches_zennit_epsilon_on_shapes_vgg(demo_model, fair_images) -> None:
    torch.set_num_threads(2)
    model, _ = demo_model("shapes-vgg")
    images = fair_images[0][:8]
    result = explain(model, images, "lrp", {"epsilon": 1.0})
    reference = _zennit_epsilon(model, images, result.targets)
    assert (result.relevance - reference).abs().max() <= 1e-4 * reference.abs().max()


@pytest.mark.parametrize("name", ["shapes-resnet", "shapes-vgg", "shapes-resnet-fair"])
def test_lrp_conservation_on_the_demo_models(name: str, demo_model, fair_images) -> None:
    """Σ R + absorbed = logit; with ε = 1 the biases and ε absorb part of the logit."""
    torch.set_num_threads(2)
    model, _ = demo_model(name)
    images = fair_images[0][:8]
    for params in ({"epsilon": 1.0}, {"rule": "alpha_beta"}):
        result = explain(model, images, "lrp", {**params, "book_absorbed": True})
        logit = np.array(result.extras["explained_logit"])
        total = np.array(result.extras["relevance_sum"]) + np.array(result.extras["absorbed"])
        np.testing.assert_allclose(total, logit, rtol=1e-4, atol=1e-4 * np.abs(logit).max())
        np.testing.assert_allclose(result.relevance.sum((1, 2, 3)).numpy(), result.extras["relevance_sum"], rtol=1e-4, atol=1e-5)


def test_randomised_weights_change_the_gradient(demo_model, fair_images, record_property) -> None:
    """Model-parameter randomisation test [Adebayo2018, §3.1]."""
    torch.set_num_threads(2)
    model, spec = demo_model("shapes-resnet-fair")
    images, labels, _ = fair_images
    torch.manual_seed(123)
    random = PixelClassifier(build_architecture(spec.architecture, spec.num_classes), spec.preprocessing).eval()
    trained = explain(model, images, "gradient", targets=labels).relevance
    randomised = explain(random, images, "gradient", targets=labels).relevance
    signed = [spearmanr(a.flatten(), b.flatten()).statistic for a, b in zip(trained, randomised, strict=True)]
    absolute = [spearmanr(a.abs().sum(0).flatten(), b.abs().sum(0).flatten()).statistic
                for a, b in zip(trained, randomised, strict=True)]
    record_property("signed_rank_correlation", float(np.mean(signed)))
    record_property("absolute_rank_correlation", float(np.mean(absolute)))
    measured = f"signed rank correlation {np.mean(signed):.3f}, absolute {np.mean(absolute):.3f}"
    assert abs(np.mean(signed)) < 0.05 and np.max(np.abs(signed)) < 0.1, measured
    assert np.mean(absolute) < 0.5, measured

"""The spurious-feature audit's library ([Singla2022, §3.2, §5]), on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from handlers.explainers.neural_features import activation_maps, neural_features
from handlers.metrics.feature_sensitivity import (
    class_features,
    gaussian_corruption,
    image_noise,
    mask_sensitivity,
    noise_sensitivity,
)
from handlers.models.architectures import SplitNetwork
from handlers.models.classifier import PixelClassifier
from protocol.validation import InvalidParameter
from tests.unit.adversarial_helpers import PRE, tiny_cnn


def _images(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_equation_1_corrupts_only_where_the_mask_is() -> None:
    x = _images(2)
    noise = image_noise(x, [3, 4])
    mask = torch.zeros(2, 8, 8, dtype=x.dtype)
    mask[:, :4] = 1.0
    mask[:, 4:6] = 0.5
    out = gaussian_corruption(x.clone(), mask, 0.3, noise)
    assert torch.equal(out[..., 6:, :], x[..., 6:, :])
    assert torch.allclose(out[..., :4, :], (x + 0.3 * noise).clamp(0, 1)[..., :4, :])
    assert torch.allclose(out[..., 4:6, :], (x + 0.15 * noise).clamp(0, 1)[..., 4:6, :])
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(image_noise(x[1:], [4]), noise[1:])  # an image's noise is its seed's


def test_importance_is_the_value_times_the_last_layer_weight() -> None:
    """Section 3.2 for a head of global pooling and one linear layer."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model = PixelClassifier(SplitNetwork(features, head), PRE).double().eval()
    x, labels = _images(4), torch.tensor([0, 1, 2, 1])
    found = class_features(model, x, labels)
    expected = found.values * head[-1].weight.detach()[labels]
    assert torch.allclose(found.importance, expected, atol=1e-12)
    assert torch.equal(found.predictions, model(x).argmax(1))


def test_answers_do_not_depend_on_the_batch_and_groups_are_max_unions() -> None:
    model, x = tiny_cnn(classes=4, seed=2), _images(5)
    seeds, sigmas = [11, 12, 13, 14, 15], [0.2, 0.6]
    together = noise_sensitivity(model, x, seeds, [0, 3, 5], sigmas, groups=[[3], [0, 5]])
    alone = [noise_sensitivity(model, x[i : i + 1], seeds[i : i + 1], [0, 3, 5], sigmas, groups=[[3], [0, 5]]) for i in range(5)]
    assert torch.equal(together.features, torch.cat([a.features for a in alone], dim=2))
    assert torch.equal(together.groups, torch.cat([a.groups for a in alone], dim=2))
    assert torch.equal(together.groups[0], together.features[1])  # a group of one is that feature
    nams = activation_maps(neural_features(model, x, None).maps[:, [0, 5]], (8, 8))
    union = nams.amax(dim=1)
    corrupted = gaussian_corruption(x.clone(), union, 0.6, image_noise(x, seeds))
    assert torch.equal(together.groups[1, 1], model(corrupted).argmax(1))
    assert torch.allclose(together.coverage[0], nams[:, 0].mean(dim=(1, 2)))
    assert torch.equal(together.clean, model(x).argmax(1))
    assert (together.features != together.clean).any()  # noise of 0.6 moves some prediction


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"features": [8]}, "features"),
        ({"groups": [[0], [-1]]}, "groups"),
        ({"features": [], "groups": []}, "features"),
        ({"groups": [[]]}, "groups"),
        ({"sigmas": [0.0]}, "sigmas"),
        ({"sigmas": []}, "sigmas"),
        ({"seeds": [1]}, "seeds"),
    ],
)
def test_refuses_bad_parameters(kwargs: dict, param: str) -> None:
    model, x = tiny_cnn(classes=4), _images(2)
    args = {"seeds": [1, 2], "features": [0], "sigmas": [0.5], "groups": None, **kwargs}
    with pytest.raises(InvalidParameter) as refused:
        noise_sensitivity(model, x, **args)
    assert refused.value.param == param


def test_annotated_masks_use_the_same_noise_as_feature_masks() -> None:
    """A feature's own activation map given as an annotated mask gives its predictions."""
    model, x = tiny_cnn(classes=4, seed=2), _images(5)
    seeds, sigmas = [11, 12, 13, 14, 15], [0.2, 0.6]
    by_feature = noise_sensitivity(model, x, seeds, [3], sigmas)
    nam = activation_maps(neural_features(model, x, None).maps[:, 3], (8, 8))
    predictions, clean = mask_sensitivity(model, x, nam, seeds, sigmas)
    assert torch.equal(predictions, by_feature.features[0]) and torch.equal(clean, by_feature.clean)
    with pytest.raises(InvalidParameter, match="masks"):
        mask_sensitivity(model, x, nam[:, :4], seeds, sigmas)
    with pytest.raises(InvalidParameter, match="masks"):
        mask_sensitivity(model, x, nam * 2, seeds, sigmas)

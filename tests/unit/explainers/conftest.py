"""Tiny classifiers for the explainer unit tests (built in the test, random weights)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from handlers.models.architectures import build_architecture
from handlers.models.classifier import PixelClassifier
from protocol.spec import Preprocessing

PREPROCESSING = Preprocessing(resize=16, crop=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
SIZE = 16
NUM_CLASSES = 4


def randomize_batch_norm(network: nn.Module, generator: torch.Generator, bn_eps: float | None = None) -> None:
    """Give every batch norm non-trivial running statistics and affine parameters."""
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_((torch.rand(c, generator=generator) - 0.5) * 0.5)
            if bn_eps is not None:
                module.eps = bn_eps


def make_classifier(
    architecture: str = "shapes_resnet",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bn_eps: float | None = None,
) -> PixelClassifier:
    """A small random PixelClassifier (16x16 input, 4 classes) with non-trivial batch norms."""
    torch.manual_seed(seed)
    network = build_architecture(architecture, NUM_CLASSES)
    with torch.no_grad():
        randomize_batch_norm(network, torch.Generator().manual_seed(seed), bn_eps)
    return PixelClassifier(network, PREPROCESSING).eval().to(dtype)


def make_images(batch: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random images in [0, 1] with some structure (a bright square) so SLIC finds segments."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, SIZE, SIZE, generator=generator) * 0.3
    images[:, :, 4:10, 5:12] += 0.6
    return images.to(dtype)


@pytest.fixture(scope="module")
def classifier_factory() -> Callable[..., PixelClassifier]:
    torch.set_num_threads(1)
    return make_classifier


@pytest.fixture()
def resnet() -> PixelClassifier:
    torch.set_num_threads(1)
    return make_classifier("shapes_resnet")


@pytest.fixture()
def vgg() -> PixelClassifier:
    torch.set_num_threads(1)
    return make_classifier("shapes_vgg")


@pytest.fixture()
def images() -> torch.Tensor:
    return make_images()


def fast_params(name: str) -> dict:
    """Small sample counts so every method runs in well under a second on one core."""
    return {
        "smoothgrad": {"n": 6, "batch_size": 4},
        "integrated_gradients": {"steps": 8, "batch_size": 8},
        "lime": {"n": 64, "n_segments": 8, "num_features": 3, "batch_size": 32},
    }.get(name, {})


def hook_count(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks on every submodule."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the state dict, to compare against after explaining."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], modules_before: list[type]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert [type(m) for m in model.modules()] == modules_before
    assert hook_count(model) == 0
    assert not model.training

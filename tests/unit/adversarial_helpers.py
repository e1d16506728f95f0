"""Tiny models and reference implementations for the attack, APEM and criticism unit tests."""

from __future__ import annotations

import torch
from torch import nn

from handlers.models.architectures import SplitNetwork
from handlers.models.classifier import PixelClassifier
from protocol.spec import Preprocessing

PRE = Preprocessing(resize=8, crop=8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def tiny_cnn(classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64, bn: bool = True) -> PixelClassifier:
    """A small conv net (conv, BN, ReLU, max-pool, conv, 2x2 pooling, linear) in [0, 1] pixel space."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()]
    features = nn.Sequential(*layers)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))
    model = PixelClassifier(SplitNetwork(features, head), PRE).to(dtype)
    if bn:  # non-trivial running statistics
        bn_layer = features[1]
        bn_layer.running_mean.uniform_(-0.2, 0.2)
        bn_layer.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():  # sharper logits: predictions vary between images and flip
        head[-1].weight.mul_(8.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class LinearPixelModel(nn.Module):
    """``logits = W x + b`` on flattened pixels: flips along a line are known in closed form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def images(n: int, size: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, size, size), generator=generator).to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], training: bool = False) -> None:
    """Same state (parameters and buffers), same mode, no parameter gradient written."""
    assert model.training is training
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())

"""Neural features of the penultimate layer ([Singla2022, §3, App. A.1]).

Shared by the NAM explainer and the spurious-feature audit
(:mod:`handlers.metrics.feature_sensitivity`): feature ``k`` is channel ``k`` of the last
convolutional feature map ``A`` (before global average pooling), its value ``e_k`` the
mean of ``A^k``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from handlers.explainers.gradcam import feature_map_gradients, upsample
from protocol.params.explainers import Interpolation


class NeuralFeatures(NamedTuple):
    """The feature maps of a batch and each feature's importance for each image's target."""

    maps: Tensor
    """``(N, C, h, w)``: ``A``, detached."""
    values: Tensor
    """``(N, C)``: ``e_k``, the mean of ``A^k`` (the neural feature vector)."""
    importance: Tensor
    """``(N, C)``: ``e_k * ∂y_target/∂e_k`` ([Singla2022, §3.2]: the feature's value
    times its last-layer weight for the class, the gradient form holding for deeper heads)."""
    targets: Tensor
    """``(N,)``: the class each importance is for (the prediction when none was given)."""


def neural_features(model: nn.Module, images: Tensor, targets: Tensor | None) -> NeuralFeatures:
    """Feature maps, values and importances for ``targets`` (default: the predictions)."""
    maps, grad, targets = feature_map_gradients(model, images, targets)
    values = maps.mean(dim=(2, 3))
    return NeuralFeatures(maps, values, values * grad.sum(dim=(2, 3)), targets)


def activation_maps(maps: Tensor, size: tuple[int, int], interpolation: Interpolation = "bilinear") -> Tensor:
    """Neural activation maps [Singla2022, App. A.1]: each ``(..., h, w)`` map
    normalised to [0, 1] on its own and resized to ``size``; ``(..., H, W)``."""
    flat = maps.reshape(-1, *maps.shape[-2:])
    low = flat.amin(dim=(1, 2), keepdim=True)
    span = (flat.amax(dim=(1, 2), keepdim=True) - low).clamp(min=1e-12)
    resized = upsample((flat - low) / span, size, interpolation)
    return resized.reshape(*maps.shape[:-2], *size)

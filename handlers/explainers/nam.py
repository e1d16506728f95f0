"""Neural activation map (NAM) of a penultimate-layer feature."""

from __future__ import annotations

from torch import Tensor, nn

from handlers.explainers.base import (
    Attribution,
    Explainer,
    InvalidParameter,
    register,
)
from handlers.explainers.neural_features import activation_maps, neural_features
from protocol.params.explainers import NamParams


@register("nam")
class Nam(Explainer):
    """Neural activation map [Singla2022, App. A.1].

    The feature map ``A^k`` of penultimate-layer feature ``k`` (the channel of the last
    convolutional block, before global average pooling) is normalised to [0, 1] per image
    and resized to the image. Without ``feature``, ``k`` is the feature with the highest
    importance for the target class ([Singla2022, §3.2]: mean activation times the
    last-layer weight; computed as ``e_k · ∂y_c/∂e_k`` so it also holds for deeper heads).
    ``extras``: ``feature`` and its ``importance`` per image. The map is spread equally
    over the input channels.
    """

    Params = NamParams

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Pick the feature (given or most important), normalise its map, resize."""
        features_of = neural_features(model, images, targets)
        importance, targets = features_of.importance, features_of.targets
        num = features_of.maps.shape[1]
        if self.params.feature is None:
            features = importance.argmax(dim=1)
        elif self.params.feature >= num:
            raise InvalidParameter("feature", f"{self.params.feature} is out of range for {num} features")
        else:
            features = targets.new_full(targets.shape, self.params.feature)
        rows = range(len(features))
        nam = activation_maps(features_of.maps[rows, features], images.shape[-2:], self.params.interpolation)
        relevance = (nam / images.shape[1]).unsqueeze(1).expand_as(images).contiguous()
        extras = {
            "feature": features.tolist(),
            "importance": importance[rows, features].tolist(),
        }
        return Attribution(relevance, targets, extras)

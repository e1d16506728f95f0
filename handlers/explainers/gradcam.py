"""Grad-CAM on the last convolutional block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, autograd, nn

from handlers.explainers.base import (
    Attribution,
    Explainer,
    register,
    resolve_targets,
    select_logits,
)
from handlers.models.derived import inference_features
from protocol.params.explainers import GradCamParams, Interpolation


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(feature_map, head)`` of a :class:`~handlers.models.classifier.PixelClassifier`."""
    if not (hasattr(model, "feature_map") and hasattr(model, "head")):
        raise TypeError("the model must expose feature_map(x) and head (a PixelClassifier)")
    return model.feature_map, model.head


def feature_map_gradients(
    model: nn.Module, images: Tensor, targets: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Last feature map ``A``, ``d logit_target / dA`` and the resolved targets."""
    _, head = split_model(model)
    # The gradient only runs through the head: the rest runs as the fused inference copy.
    activations = inference_features(model, images).requires_grad_(True)
    logits = head(activations)
    targets = resolve_targets(logits, targets)
    (grad,) = autograd.grad(select_logits(logits, targets).sum(), activations)
    return activations.detach(), grad, targets


def upsample(maps: Tensor, size: tuple[int, int], mode: Interpolation) -> Tensor:
    """``(B, h, w)`` maps resized to ``size``."""
    corners = None if mode == "nearest" else False
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, align_corners=corners).squeeze(1)


@register("gradcam")
class GradCam(Explainer):
    """Grad-CAM [Selvaraju2017, eqs. 1-2] on the last convolutional feature map.

    ``α_k = mean_ij ∂y_c/∂A^k_ij`` and ``L = ReLU(Σ_k α_k A^k)``, upsampled to the image
    (a class activation map in the sense of [Singla2022, §2]). ``A`` is
    ``model.feature_map(x)`` and ``y = model.head(A)``, so the gradient only runs through
    the head. The map is spread equally over the input channels (the channel sum is ``L``).
    """

    Params = GradCamParams

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Channel weights from head gradients, weighted sum of the feature maps, resize."""
        activations, grad, targets = feature_map_gradients(model, images, targets)
        cam = (grad.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1)
        if self.params.relu:
            cam = cam.clamp(min=0)
        cam = upsample(cam, images.shape[-2:], self.params.interpolation)
        channels = images.shape[1]
        return Attribution((cam / channels).unsqueeze(1).expand_as(images).contiguous(), targets)

"""Gradient: the plain input gradient of the target logit."""

from __future__ import annotations

from torch import Tensor, autograd, nn

from handlers.explainers.base import (
    Attribution,
    Explainer,
    register,
    resolve_targets,
    select_logits,
)
from protocol.params.explainers import GradientParams


@register("gradient")
class Gradient(Explainer):
    """Sensitivity map ``M_c(x) = dS_c(x) / dx`` [doValle2019, §4.2.1].

    ``S_c`` is the target logit; the gradient is taken with respect to the [0, 1] pixels,
    signed and per channel (what captum's ``Saliency(abs=False)`` returns). One forward and
    one backward pass for the whole batch; the predicted class comes from the same forward.
    """

    Params = GradientParams
    input_gradients_only = True

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Input gradient of ``logits[b, targets[b]]`` for every image ``b``."""
        inputs = images.detach().requires_grad_(True)
        logits = model(inputs)
        targets = resolve_targets(logits, targets)
        (grad,) = autograd.grad(select_logits(logits, targets).sum(), inputs)
        return Attribution(grad, targets)

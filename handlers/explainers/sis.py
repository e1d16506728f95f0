"""Sufficient input subsets: the few pixels that alone keep the model confident [Carter2021].

[Carter2021, abstract] ("Overinterpretation reveals image classification model
pathologies") finds classifiers that stay confident "even when 95% of an input
image has been masked": the pixel subset they keep is sufficient for the decision although
nothing in it is salient to a person. A sufficient input subset (SIS) is a set ``S`` of
pixels with ``f_c(x_S) >= tau``, where ``x_S`` shows the pixels of ``S`` and masks the rest
and ``f_c`` is the target class's probability; the SIS reported is the smallest one found
by backward selection (remove the pixel whose loss costs the least confidence, repeat).
The local copy of [Carter2021] is the abstract only: ``keep_fraction`` 0.05 is its 95 %; the
threshold, the masking value and the gradient-guided batches are ours and are parameters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, autograd, nn

from handlers import visualization
from handlers.deadline import check_time
from handlers.explainers.base import (
    Attribution,
    Explainer,
    Explanation,
    chunks,
    register,
    select_logits,
)
from handlers.models.derived import fused_classifier, inference_logits
from protocol.budget import images_per_pass
from protocol.params.explainers import SisParams


def masked_pixel(model: nn.Module, images: Tensor, mask_value: str | float) -> Tensor:
    """The ``(1, C, 1, 1)`` pixel a masked position shows.

    ``'mean'`` is the model's own normalisation mean (a :class:`PixelClassifier`'s
    ``normalize.mean``), which the network sees as zero; 0.5 grey for a model without one.
    """
    if mask_value == "mean":
        mean = getattr(getattr(model, "normalize", None), "mean", None)
        if mean is not None:
            return mean.detach().to(images).reshape(1, -1, 1, 1)
        mask_value = 0.5
    return torch.full((1, images.shape[1], 1, 1), float(mask_value), dtype=images.dtype, device=images.device)


def show(images: Tensor, fill: Tensor, shown: Tensor) -> Tensor:
    """``images`` where ``shown`` (``(B, 1, H, W)``, 0 to 1) says, ``fill`` elsewhere."""
    return fill + shown * (images - fill)


@register("sis")
class SufficientInputSubset(Explainer):
    """Sufficient input subsets by gradient-guided backward selection [Carter2021, abstract].

    All pixels start shown. Each step is one forward and backward pass of the batch (through
    the model's fused copy, :class:`~handlers.models.derived.FusedClassifier`): the
    gradient ``g`` of the target's log-odds ``log(p / (1 - p))`` with respect to the mask
    estimates what removing a pixel costs (``-g``; the same order as the probability's
    gradient, a positive multiple of it, but it does not vanish where ``p`` rounds to 1),
    and the ``step_fraction`` of all pixels with the smallest ``g`` among those still shown
    are masked (exact backward selection would score every pixel with its own pass; this is
    the batched, first-order version). The steps record the confidence of every shrinking
    subset, so the SIS is the smallest subset whose confidence is still at least
    ``threshold`` (the pixels left at the last step where it was). Separately, the last
    ``keep_fraction`` of the removal order is scored alone: the paper's "confident with
    95 % masked" check.

    Relevance: a pixel's place in the removal order, ``(rank + 1) / (H W)``, so the last
    pixel removed is 1; spread equally over the channels. ``extras`` per image:
    ``sis_fraction`` and ``sis_confidence`` (None when the whole image is below the
    threshold), ``sis_mask`` ``(B, H, W)`` uint8, ``kept_fraction``, ``kept_confidence``,
    ``kept_prediction``, ``confident_when_kept`` (kept prediction is the target and at the
    threshold), and the curve ``shown_fraction`` / ``confidence`` over the selection steps.
    """

    Params = SisParams

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Backward selection ``batch_size`` images at a time, then the kept subsets scored."""
        targets = self.predicted_targets(model, images, targets)
        fill = masked_pixel(model, images, self.params.mask_value)
        batch, channels, height, width = images.shape
        pixels = height * width
        order = torch.empty(batch, pixels, dtype=torch.long, device=images.device)
        curves = []
        differentiable = fused_classifier(model, images)  # the selection's gradients only
        for part in chunks(batch, images_per_pass(self.params.batch_size, images.shape)):
            order[part], curve = self._backward_selection(differentiable, images[part], targets[part], fill)
            curves.append(curve)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=images.device).expand(batch, -1))
        relevance = ((rank + 1).to(images.dtype) / (pixels * channels)).view(batch, 1, height, width)
        extras = self._subsets(model, images, targets, fill, order, torch.cat(curves, dim=1))
        return Attribution(relevance.expand(-1, channels, -1, -1).contiguous(), targets, extras)

    @classmethod
    def pictures(cls, explanation: Explanation, image: Tensor, outputs: set[str]) -> dict[str, bytes]:
        """The image with only its sufficient subset shown, as ``attention_png``."""
        if "attention_png" not in outputs:
            return {}
        return {"attention_png": visualization.subset_png(image, explanation.extras["sis_mask"][0])}

    def _backward_selection(
        self, model: nn.Module, images: Tensor, targets: Tensor, fill: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Removal order ``(b, H W)`` and the confidence curve ``(steps, b)`` of the subsets.

        Row ``s`` of the curve is the target probability with the pixels removed before step
        ``s`` masked; ``removal_sizes`` gives how many pixels each step removes.
        """
        batch, _, height, width = images.shape
        pixels = height * width
        shown = torch.ones(batch, pixels, dtype=torch.bool, device=images.device)
        order = torch.empty(batch, pixels, dtype=torch.long, device=images.device)
        confidence, removed = [], 0
        for size in removal_sizes(pixels, self.params.step_fraction):
            check_time("SIS")
            mask = shown.view(batch, 1, height, width).to(images.dtype).requires_grad_(True)
            odds = log_odds(model(show(images, fill, mask)), targets)
            (gradient,) = autograd.grad(odds.sum(), mask)
            confidence.append(torch.sigmoid(odds.detach()))
            cost = gradient.view(batch, pixels).masked_fill(~shown, math.inf)
            chosen = cost.topk(size, dim=1, largest=False, sorted=True).indices
            order[:, removed : removed + size] = chosen
            shown.scatter_(1, chosen, False)
            removed += size
        return order, torch.stack(confidence)

    def _subsets(
        self, model: nn.Module, images: Tensor, targets: Tensor, fill: Tensor, order: Tensor, curve: Tensor
    ) -> dict[str, Any]:
        """The SIS from the curve, and the kept ``keep_fraction`` scored on its own."""
        p = self.params
        batch, _, height, width = images.shape
        pixels = height * width
        sizes = pixels - torch.tensor([0, *removal_sizes(pixels, p.step_fraction)[:-1]]).cumsum(0)
        sufficient = curve >= p.threshold  # (steps, B)
        last = torch.where(sufficient, torch.arange(len(curve), device=curve.device)[:, None], -1).amax(0)
        kept = max(1, math.ceil(p.keep_fraction * pixels))
        kept_mask = torch.zeros(batch, pixels, dtype=images.dtype, device=images.device)
        kept_mask.scatter_(1, order[:, pixels - kept :], 1.0)
        probabilities = inference_logits(model, show(images, fill, kept_mask.view(batch, 1, height, width))).softmax(1)
        kept_confidence = select_logits(probabilities, targets)
        kept_prediction = probabilities.argmax(1)
        sis_mask = np.zeros((batch, height, width), dtype=np.uint8)
        sis_fraction: list[float | None] = []
        sis_confidence: list[float | None] = []
        for b, step in enumerate(last.tolist()):
            if step < 0:
                sis_fraction.append(None)
                sis_confidence.append(None)
                continue
            size = int(sizes[step])
            sis_mask[b].reshape(-1)[order[b, pixels - size :].cpu().numpy()] = 1
            sis_fraction.append(size / pixels)
            sis_confidence.append(float(curve[step, b]))
        confident = (kept_prediction == targets) & (kept_confidence >= p.threshold)
        shown_fraction = (sizes.double() / pixels).tolist()
        return {
            "sis_fraction": sis_fraction,
            "sis_confidence": sis_confidence,
            "sis_mask": sis_mask,
            "kept_fraction": [kept / pixels] * batch,
            "kept_confidence": kept_confidence.tolist(),
            "kept_prediction": kept_prediction.tolist(),
            "confident_when_kept": confident.tolist(),
            "shown_fraction": [shown_fraction] * batch,
            "confidence": curve.t().tolist(),
        }


def log_odds(logits: Tensor, targets: Tensor) -> Tensor:
    """``log(p_c / (1 - p_c))`` of the softmax: the target logit less the others' logsumexp."""
    target = select_logits(logits, targets)
    others = logits.scatter(1, targets.view(-1, 1), -math.inf).logsumexp(dim=1)
    return target - others


def removal_sizes(pixels: int, step_fraction: float) -> list[int]:
    """Pixels removed at each selection step: ``round(step_fraction * pixels)``, the rest last."""
    step = max(1, round(step_fraction * pixels))
    return [min(step, pixels - start) for start in range(0, pixels, step)]

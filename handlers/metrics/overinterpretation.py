"""Overinterpretation of a set of images [Carter2021]: each image's sufficient input subset
for its label, the confidence left with 95 % of it masked, and where the subset lies.

[Carter2021, abstract] calls a confident decision without salient supporting pixels
overinterpretation, and shows CIFAR-10 models "confident even when 95% of an input image
has been masked". This scores a set with the ``sis`` explainer (its parameters, its
definitions) and, for images given annotated regions (a core and a spurious mask, as in
[Singla2022]'s Salient ImageNet), the share of each subset on each region: a subset that lies
on the background is the pathology the paper shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from handlers.explainers import explain
from handlers.models.derived import inference_logits
from protocol.validation import InvalidParameter


@dataclass(frozen=True)
class SubsetReport:
    """Per image, in order: what :func:`sufficient_subsets` found."""

    params: dict[str, Any]
    predictions: list[int]
    sis_fraction: list[float | None]
    sis_confidence: list[float | None]
    kept_fraction: float
    kept_confidence: list[float]
    kept_prediction: list[int]
    confident_when_kept: list[bool]
    region_share: dict[str, list[float | None]]
    region_coverage: dict[str, list[float]]


def sufficient_subsets(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    params: Mapping[str, Any] | None = None,
    regions: Mapping[str, Tensor] | None = None,
) -> SubsetReport:
    """Sufficient input subsets of ``images`` for ``labels`` and their overlap with regions.

    Args:
        model: Classifier of [0, 1] pixels.
        images: ``(B, C, H, W)`` in [0, 1].
        labels: ``(B,)`` the classes whose subsets are sought (a dataset's labels).
        params: The ``sis`` explainer's parameters.
        regions: Named ``(B, H, W)`` masks in [0, 1] (soft masks count by their level).

    Returns:
        The report; ``region_share[name][b]`` is the mask's mass over image ``b``'s subset
        divided by the subset's size (None without a subset), ``region_coverage`` the mask's
        mean over the image.

    Raises:
        InvalidParameter: a parameter of the explainer, or a region of another shape.
    """
    explanation = explain(model, images, "sis", params, targets=labels)
    extras = explanation.extras
    subset = torch.from_numpy(extras["sis_mask"]).to(images.device, images.dtype)
    size = subset.sum(dim=(1, 2))
    shares: dict[str, list[float | None]] = {}
    coverage: dict[str, list[float]] = {}
    for name, mask in (regions or {}).items():
        if mask.shape != subset.shape:
            raise InvalidParameter("regions", f"{name} masks are {tuple(mask.shape)}, the images {tuple(subset.shape)}")
        on = (subset * mask).sum(dim=(1, 2)) / size.clamp(min=1)
        shares[name] = [float(v) if n > 0 else None for v, n in zip(on.tolist(), size.tolist(), strict=True)]
        coverage[name] = mask.mean(dim=(1, 2)).tolist()
    return SubsetReport(
        params=explanation.params,
        predictions=inference_logits(model, images).argmax(dim=1).tolist(),
        sis_fraction=extras["sis_fraction"],
        sis_confidence=extras["sis_confidence"],
        kept_fraction=extras["kept_fraction"][0],
        kept_confidence=extras["kept_confidence"],
        kept_prediction=extras["kept_prediction"],
        confident_when_kept=extras["confident_when_kept"],
        region_share=shares,
        region_coverage=coverage,
    )

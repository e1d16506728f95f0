"""``mask_sensitivity``: predictions with annotated regions (one soft mask per image)
corrupted by Gaussian noise [Singla2022, §5, def. 2]."""

from __future__ import annotations

import time

from handlers.metrics.feature_sensitivity import mask_sensitivity
from handlers.tasks.common import refusals, region_masks, stamp, tensors
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract


@runs(contract.MaskSensitivityRequest)
def run(served: ServedModel, request: contract.MaskSensitivityRequest) -> contract.MaskSensitivityResult:
    start = time.perf_counter()
    x = tensors(served, request.images)
    masks = region_masks(served, "masks", request.masks, x)
    with refusals():
        predictions, clean = mask_sensitivity(served.model, x, masks, request.seeds, request.sigmas)
    return contract.MaskSensitivityResult(
        sigmas=request.sigmas, clean=clean.tolist(), predictions=predictions.tolist(),
        coverage=masks.mean(dim=(1, 2)).tolist(), **stamp(served, start),
    )

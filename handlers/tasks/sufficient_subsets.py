"""``sufficient_subsets``: each image's sufficient input subset for its label ([Carter2021], the
``sis`` explainer) and, given region masks, the subsets' share on those regions."""

from __future__ import annotations

import dataclasses
import time

import torch

from handlers.metrics.overinterpretation import sufficient_subsets
from handlers.tasks.common import one_per_image, refusals, region_masks, stamp, tensors
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract


@runs(contract.SufficientSubsetsRequest)
def run(served: ServedModel, request: contract.SufficientSubsetsRequest) -> contract.SufficientSubsetsResult:
    start = time.perf_counter()
    x = tensors(served, request.images)
    one_per_image("labels", request.labels, x)
    regions = {name: region_masks(served, f"regions.{name}", masks, x) for name, masks in request.regions.items()}
    with refusals():
        report = sufficient_subsets(served.model, x, torch.tensor(request.labels), request.params, regions)
    return contract.SufficientSubsetsResult(**dataclasses.asdict(report), **stamp(served, start))

"""``apem_set``: APEM of many images' stage-2 explanations of their predictions, with their
losses [doValle2019, ch. 3, §5.4]; the caller correlates them over its set."""

from __future__ import annotations

import time

import torch

from handlers import visualization
from handlers.metrics.apem import apem
from handlers.tasks.common import checked, explanation, one_per_image, refusals, stamp, tensors
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.params.metrics import ApemParams


@runs(contract.ApemSetRequest)
def run(served: ServedModel, request: contract.ApemSetRequest) -> contract.ApemSetResult:
    start = time.perf_counter()
    x = tensors(served, request.images)
    if request.labels is not None:
        one_per_image("labels", request.labels, x)
    apem_params = checked(ApemParams, request.apem_params)
    found = explanation(served, x, request.method, request.params, None)
    maps = visualization.to_stage(found.relevance, x, 2)
    labels = None if request.labels is None else torch.tensor(request.labels)
    with refusals():
        outcome = apem(served.model, x, maps, targets=found.targets, labels=labels, params=apem_params)
    return contract.ApemSetResult(
        method=found.method, method_params=found.params,
        params=outcome.params.model_dump(), grid=outcome.params.grid_description(),
        approximate=outcome.approximate, targets=outcome.targets,
        eps_minus=outcome.eps_minus, eps_plus=outcome.eps_plus, apem=outcome.apem_per_image,
        apem_norm=outcome.apem_norm_per_image, losses=outcome.losses, **stamp(served, start),
    )

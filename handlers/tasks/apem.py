"""``apem``: the APEM score [doValle2019, ch. 3] of one image's stage-2 explanation by a
method, or of a [0, 1] map the request brings."""

from __future__ import annotations

import time
from typing import Any

import torch

from handlers import visualization
from handlers.metrics.apem import apem
from handlers.tasks.common import (
    TaskError,
    checked,
    checked_target,
    explanation,
    probabilities,
    refusals,
    stamp,
    tensor,
)
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.arrays import decode_array
from protocol.params.metrics import ApemParams


@runs(contract.ApemRequest)
def run(served: ServedModel, request: contract.ApemRequest) -> contract.ApemResult:
    start = time.perf_counter()
    x = tensor(served, request.image)
    apem_params = checked(ApemParams, request.apem_params)
    score_map, target, method_params = scored_map(served, x, request)
    score = apem_score(served, x, score_map, target, apem_params)
    return contract.ApemResult(method=request.method, method_params=method_params, target=target,
                               **score.model_dump(), **stamp(served, start))


def apem_score(served: ServedModel, x: torch.Tensor, stage_map: torch.Tensor, target: int,
               apem_params: ApemParams) -> contract.ApemScore:
    """APEM of a [0, 1] map [doValle2019, ch. 3] for one image."""
    with refusals():
        outcome = apem(served.model, x, stage_map, targets=torch.tensor([target]), params=apem_params)
    return contract.ApemScore(**outcome.score(0))


def scored_map(
    served: ServedModel, x: torch.Tensor, request: contract.ApemRequest | contract.FilterRequest
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """The ``(1, C, S, S)`` [0, 1] map a request scores (its method's stage-2 explanation
    or its own ``relevance``), the explained class and the method's parameters."""
    if (request.method is None) == (request.relevance is None):
        raise TaskError(422, "bad_request", "give either an explanation method or a relevance map")
    if request.method is not None:
        found = explanation(served, x, request.method, request.params, request.target)
        return visualization.to_stage(found.relevance, x, 2), int(found.targets[0]), found.params
    size = served.spec.preprocessing.crop
    with refusals():
        array = decode_array(request.relevance)
    if array.shape not in ((size, size), (1, size, size), (3, size, size)):
        raise TaskError(422, "invalid_relevance",
                        f"relevance must be ({size}, {size}), (1, {size}, {size}) or (3, {size}, {size}); "
                        f"got {tuple(array.shape)}")
    if array.min() < 0 or array.max() > 1:
        raise TaskError(422, "invalid_relevance", "relevance values must lie in [0, 1]")
    target = int(probabilities(served, x)[0].argmax()) if request.target is None else request.target
    checked_target(served, target)
    return torch.from_numpy(array).unsqueeze(0).to(served.device), target, {}

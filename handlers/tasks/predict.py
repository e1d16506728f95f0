"""``predict``: the top classes of each image, every request of a batch in one forward pass
(TorchServe batches requests across callers)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from handlers.tasks.common import TaskError, class_score, probabilities, stamp, tensor
from handlers.tasks.registry import runs_batched
from handlers.tasks.served import ServedModel
from protocol import contract


@runs_batched(contract.PredictRequest)
def run(served: ServedModel, requests: Sequence[contract.PredictRequest]) -> list[contract.PredictResult | TaskError]:
    start = time.perf_counter()
    decoded: list[torch.Tensor | TaskError] = []
    for request in requests:
        try:
            decoded.append(tensor(served, request.image))
        except TaskError as error:
            decoded.append(error)
    good = [t for t in decoded if isinstance(t, torch.Tensor)]
    probs = probabilities(served, torch.cat(good)) if good else torch.empty(0)
    results: list[contract.PredictResult | TaskError] = []
    row = 0
    for request, item in zip(requests, decoded, strict=True):
        if isinstance(item, TaskError):
            results.append(item)
            continue
        k = min(request.top_k, served.spec.num_classes)
        values, indices = probs[row].topk(k)
        row += 1
        results.append(contract.PredictResult(
            predictions=[class_score(served, int(i), float(v)) for v, i in zip(values, indices, strict=True)],
            **stamp(served, start),
        ))
    return results

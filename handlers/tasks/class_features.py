"""``class_features``: each image's neural features and their importance for its label
[Singla2022, §3.2]; the caller averages them over a class to rank its features."""

from __future__ import annotations

import time

import torch

from handlers.metrics.feature_sensitivity import class_features
from handlers.tasks.common import one_per_image, refusals, stamp, tensors
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.arrays import encode_array
from protocol.validation import check_class_index


@runs(contract.ClassFeaturesRequest)
def run(served: ServedModel, request: contract.ClassFeaturesRequest) -> contract.ClassFeaturesResult:
    start = time.perf_counter()
    x = tensors(served, request.images)
    one_per_image("labels", request.labels, x)
    with refusals():
        check_class_index("labels", request.labels, served.spec.num_classes)
    found = class_features(served.model, x, torch.tensor(request.labels, device=served.device))
    return contract.ClassFeaturesResult(
        importance=encode_array(found.importance), values=encode_array(found.values),
        predictions=found.predictions.tolist(), **stamp(served, start),
    )

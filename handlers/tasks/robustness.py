"""``robustness``: steps to flip each image under an iterative attack (adversarial model
criticism, [Stock2018, §3.3])."""

from __future__ import annotations

import time

from handlers.tasks.attack import attacked
from handlers.tasks.common import stamp, tensors
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract


@runs(contract.RobustnessRequest)
def run(served: ServedModel, request: contract.RobustnessRequest) -> contract.RobustnessResult:
    start = time.perf_counter()
    x = tensors(served, request.images)
    result, params = attacked(served, request.method, request.params, x)
    return contract.RobustnessResult(
        method=request.method, params=params, steps_to_flip=result.steps_to_flip_list(),
        predictions=result.clean_predictions.tolist(),
        adversarial_predictions=result.predictions.tolist(),
        robustness=result.reference_confidence.tolist(), **stamp(served, start),
    )

"""``noise_sensitivity``: predictions with neural features' regions corrupted by Gaussian
noise [Singla2022, §5, eqs. 1-2]: each feature alone, each group's union."""

from __future__ import annotations

import time

from handlers.metrics.feature_sensitivity import noise_sensitivity
from handlers.tasks.common import refusals, stamp, tensors
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract


@runs(contract.NoiseSensitivityRequest)
def run(served: ServedModel, request: contract.NoiseSensitivityRequest) -> contract.NoiseSensitivityResult:
    start = time.perf_counter()
    x = tensors(served, request.images)
    with refusals():
        found = noise_sensitivity(served.model, x, request.seeds, request.features, request.sigmas, request.groups)
    return contract.NoiseSensitivityResult(
        sigmas=request.sigmas, clean=found.clean.tolist(), features=found.features.tolist(),
        groups=found.groups.tolist(), coverage=found.coverage.tolist(), **stamp(served, start),
    )

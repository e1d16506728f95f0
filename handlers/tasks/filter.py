"""``filter``: the Explanation Filter [doValle2019, Alg. 2] of one image's stage-2 map,
or of a [0, 1] map the request brings (a filter job resuming where a call ran out of time)."""

from __future__ import annotations

import time

from handlers.metrics.explanation_filter import explanation_filter
from handlers.tasks.apem import scored_map
from handlers.tasks.common import checked, refusals, stamp, tensor
from handlers.tasks.explain import map_pictures
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.arrays import encode_array
from protocol.params.metrics import ApemParams, FilterParams


@runs(contract.FilterRequest)
def run(served: ServedModel, request: contract.FilterRequest) -> contract.FilterResult:
    start = time.perf_counter()
    x = tensor(served, request.image)
    apem_params = checked(ApemParams, request.apem_params)
    filter_params = checked(FilterParams, {"levels": 256, **request.filter_params})
    stage_map, target, method_params = scored_map(served, x, request)
    with refusals():
        outcome = explanation_filter(served.model, x[0], stage_map[0], target, apem_params, filter_params)
    return contract.FilterResult(
        method=request.method, params=method_params, target=target,
        filtered=encode_array(outcome.filtered.cpu().numpy()),
        **map_pictures({"heatmap_png", "overlay_png"}, outcome.filtered, x[0].cpu(), "inferno"),
        filter_params=filter_params.model_dump(),
        **outcome.summary(), **stamp(served, start),
    )

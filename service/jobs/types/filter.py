"""The ``filter`` job: the Explanation Filter on one image [doValle2019, Alg. 2],
computed by TorchServe's ``filter`` task; its result is that task's :class:`FilterResult`.

A filter that outlasts one model-server call goes on in the next: a call that runs out of
the model server's time returns the map Algorithm 2 had reached (``stop="time_limit"``,
after at least one candidate), and the next call filters that map with the same target.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from typing import Any, Literal

from pydantic import Field
from starlette.concurrency import run_in_threadpool

from protocol.contract import DescribeResult, FilterRequest, FilterResult
from protocol.params.metrics import FilterParams
from service.errors import ApiError
from service.gateway.forms import check_library_params, check_target
from service.gateway.schemas import RequestModel
from service.imaging import decode_image
from service.jobs.common import check_explanation, elapsed_ms, fail, set_progress
from service.jobs.registry import JobType, Spec, register
from service.settings import Settings
from service.torchserve_client import SyncTorchServeClient


class FilterJobRequest(RequestModel):
    type: Literal["filter"]
    model: str
    method: str = Field(min_length=1, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)
    image: str = Field(description="base64 of an image file (any accepted format)")
    target: int | None = Field(None, ge=0)
    apem_params: dict[str, Any] = Field(
        default_factory=dict, description="APEM grid and search (step, max_steps, search, ...)"
    )
    filter_params: dict[str, Any] = Field(
        default_factory=dict, description="levels (default 256), candidates per batch"
    )


class FilterJobResult(FilterResult):
    """The filter job's result: TorchServe's ``FilterResult`` [doValle2019, Alg. 2]. A
    filter that outlasts one model-server call goes on in the next from the map it reached;
    the counts and ``fraction_kept`` cover all ``calls``, ``apem_before`` is the input map's."""

    type: Literal["filter"] = "filter"
    calls: int = Field(1, description="model-server calls the filter took")


@register
class Filter(JobType[FilterJobRequest]):
    request = FilterJobRequest
    result = FilterJobResult

    async def check(self, body: FilterJobRequest, described: DescribeResult, settings: Settings) -> Spec:
        """Also canonicalises the image: the spec carries its RGB PNG, whatever was uploaded."""
        check_explanation(described, "filter", body.method, body.apem_params)
        check_library_params(FilterParams, body.filter_params, "filter_params")
        check_target(body.target, described, "target")
        try:
            raw = base64.b64decode(body.image, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_image", "`image` is not valid base64") from None
        canonical = await run_in_threadpool(decode_image, raw, settings.max_image_pixels)
        return {**body.model_dump(), "image": base64.b64encode(canonical.png).decode()}

    def run(self, spec: Spec, settings: Settings) -> dict[str, Any]:
        """One filter call, or as many as it takes (see the module docstring), as one result."""
        start = time.time()
        set_progress(0.0)
        request = FilterRequest(
            image=spec["image"],
            method=spec["method"],
            params=spec.get("params", {}),
            target=spec.get("target"),
            apem_params=spec.get("apem_params", {}),
            filter_params=spec.get("filter_params", {}),
        )
        calls: list[FilterResult] = []
        with SyncTorchServeClient(settings) as client:
            while True:
                calls.append(client.call(spec["model"], request, FilterResult))
                if calls[-1].stop != "time_limit":
                    break
                if calls[-1].values_removed == 0:  # the handler returns only after progress
                    raise fail("filter: a model-server call made no progress; use fewer filter_params.levels")
                removed = sum(call.values_removed for call in calls)
                set_progress(min(0.99, removed / max(1, calls[0].distinct_values)))
                request = request.model_copy(
                    update={"method": None, "params": {}, "relevance": calls[-1].filtered, "target": calls[-1].target}
                )
        set_progress(1.0)
        first, last = calls[0], calls[-1]
        return FilterJobResult(**{
            **dict(last),
            "method": first.method,
            "params": first.params,
            "apem_before": first.apem_before,
            "values_removed": sum(call.values_removed for call in calls),
            "candidates_scored": sum(call.candidates_scored for call in calls),
            "fraction_kept": math.prod(call.fraction_kept for call in calls),
            "distinct_values": first.distinct_values,
            "calls": len(calls),
            "elapsed_ms": elapsed_ms(start),
        }).model_dump(mode="json")

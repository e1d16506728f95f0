"""``filter``: the Explanation Filter [doValle2019, Alg. 2] of one image's map."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract.apem import MapRequest
from protocol.contract.parts import EncodedArray, StampedResult
from protocol.contract.registry import register_task


class FilterRequest(MapRequest):
    """Explanation Filter [doValle2019, Alg. 2] on one image's explanation, or on a given
    [0, 1] map: the filter job resumes a filter that ran out of time with the map it reached
    (``stop="time_limit"``) and the same ``target``."""

    task: Literal["filter"] = "filter"
    filter_params: dict[str, Any] = Field(
        default_factory=dict,
        description="FilterParams; `levels` defaults to 256 (the map as an 8-bit heatmap)",
    )


class FilterResult(StampedResult):
    method: str | None
    params: dict[str, Any]
    target: int
    filtered: EncodedArray
    heatmap_png: str | None = Field(None, description="the filtered map, colormapped")
    overlay_png: str | None = Field(None, description="the filtered map over the image")
    apem_before: float | None
    apem_after: float | None
    fraction_kept: float
    values_removed: int = 0
    candidates_scored: int = 0
    stop: str = Field("", description="apem_dropped, map_exhausted, or time_limit: the call ran out of time and `filtered` is where Algorithm 2 had got to")
    approximate: bool = False
    distinct_values: int = 0
    filter_params: dict[str, Any] = Field(default_factory=dict)


register_task(FilterRequest, FilterResult)

"""``apem``: the APEM score (thesis 003, chapter 3) of one image's explanation or given map."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract.parts import ApemScore, EncodedArray, ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class ApemRequest(Strict):
    task: Literal["apem"] = "apem"
    image: ImageData
    method: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    relevance: EncodedArray | None = None
    target: int | None = None
    apem_params: dict[str, Any] = Field(default_factory=dict)


class ApemResult(StampedResult, ApemScore):
    method: str | None = None
    method_params: dict[str, Any] = Field(
        default_factory=dict, description="the explainer's parameters (none for a given map)"
    )
    target: int


register_task(ApemRequest, ApemResult)

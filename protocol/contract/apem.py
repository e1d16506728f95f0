"""``apem``: the APEM score [doValle2019, ch. 3] of one image's explanation or given map."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract.parts import ApemScore, EncodedArray, ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class MapRequest(Strict):
    """One image and the map to score: an explainer's (``method`` and its ``params``) or a
    given [0, 1] ``relevance``, for ``target`` (default: the predicted class), with APEM's
    parameters. What the ``apem`` and ``filter`` tasks both take."""

    task: str
    image: ImageData
    method: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    relevance: EncodedArray | None = None
    target: int | None = None
    apem_params: dict[str, Any] = Field(default_factory=dict)


class ApemRequest(MapRequest):
    task: Literal["apem"] = "apem"


class ApemResult(StampedResult, ApemScore):
    method: str | None = None
    method_params: dict[str, Any] = Field(
        default_factory=dict, description="the explainer's parameters (none for a given map)"
    )
    target: int


register_task(ApemRequest, ApemResult)

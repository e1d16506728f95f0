"""``apem_set``: APEM of many images' explanations, with their losses [doValle2019, §5.4]."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract.parts import ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class ApemSetRequest(Strict):
    """APEM of each image's explanation of its predicted class [doValle2019, ch. 3],
    with each image's loss for the rank correlation over a set [doValle2019, §5.4]."""

    task: Literal["apem_set"] = "apem_set"
    images: list[ImageData] = Field(min_length=1)
    labels: list[int] | None = Field(
        None, description="ground truth of each image's loss; default: its prediction"
    )
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    apem_params: dict[str, Any] = Field(default_factory=dict)


class ApemSetResult(StampedResult):
    """Per image, in request order (``None``: a size not found on the grid)."""

    method: str
    method_params: dict[str, Any]
    params: dict[str, Any] = Field(description="APEM parameters, defaults filled in")
    grid: dict[str, Any]
    approximate: bool
    targets: list[int] = Field(description="the explained class: the prediction")
    eps_minus: list[float | None]
    eps_plus: list[float | None]
    apem: list[float] = Field(description="eps+ - eps-, caps substituted")
    apem_norm: list[float] | None = None
    losses: list[float] = Field(description="cross-entropy against the labels")


register_task(ApemSetRequest, ApemSetResult)

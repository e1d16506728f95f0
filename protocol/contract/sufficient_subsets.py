"""``sufficient_subsets``: each image's sufficient input subset for its label [Carter2021]."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract.parts import ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class SufficientSubsetsRequest(Strict):
    """Each image's sufficient input subset for its label ([Carter2021], the ``sis``
    explainer) and, where region masks come with the images, the subsets' share on them."""

    task: Literal["sufficient_subsets"] = "sufficient_subsets"
    images: list[ImageData] = Field(min_length=1)
    labels: list[int] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict, description="the sis explainer's parameters")
    regions: dict[str, list[ImageData]] = Field(
        default_factory=dict, description="name -> one mask image per image (grey level = mask)"
    )


class SufficientSubsetsResult(StampedResult):
    params: dict[str, Any] = Field(description="the sis explainer's parameters, defaults filled in")
    predictions: list[int] = Field(description="the model's predictions of the whole images")
    sis_fraction: list[float | None] = Field(description="the subset's share of the image; None: none")
    sis_confidence: list[float | None]
    kept_fraction: float = Field(description="share of the pixels kept for the masked check")
    kept_confidence: list[float] = Field(description="the label's probability with only those kept")
    kept_prediction: list[int]
    confident_when_kept: list[bool]
    region_share: dict[str, list[float | None]] = Field(
        default_factory=dict, description="name -> [image] the region's share of the subset"
    )
    region_coverage: dict[str, list[float]] = Field(
        default_factory=dict, description="name -> [image] the region's share of the image"
    )


register_task(SufficientSubsetsRequest, SufficientSubsetsResult)

"""``mask_sensitivity``: predictions with annotated regions corrupted [Singla2022, §5]."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocol.contract.parts import ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class MaskSensitivityRequest(Strict):
    """Predictions with annotated regions (one soft mask image per image, its grey level
    the mask) corrupted by Gaussian noise [Singla2022, §5, def. 2]."""

    task: Literal["mask_sensitivity"] = "mask_sensitivity"
    images: list[ImageData] = Field(min_length=1)
    masks: list[ImageData] = Field(min_length=1)
    seeds: list[int]
    sigmas: list[float] = Field(min_length=1)


class MaskSensitivityResult(StampedResult):
    sigmas: list[float]
    clean: list[int] = Field(description="predictions of the clean images")
    predictions: list[list[int]] = Field(description="[sigma][image] with the masked region corrupted")
    coverage: list[float] = Field(description="[image] mean of the mask, as the model sees it")


register_task(MaskSensitivityRequest, MaskSensitivityResult)

"""``robustness``: steps to flip each image under an iterative attack (model criticism)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract.parts import ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class RobustnessRequest(Strict):
    """Steps to flip under an iterative attack, per image (adversarial model criticism)."""

    task: Literal["robustness"] = "robustness"
    images: list[ImageData] = Field(min_length=1)
    method: str = "ifgsm"
    params: dict[str, Any] = Field(default_factory=dict)


class RobustnessResult(StampedResult):
    method: str
    params: dict[str, Any]
    steps_to_flip: list[int | None]
    predictions: list[int]
    adversarial_predictions: list[int]
    robustness: list[float] = Field(
        default_factory=list,
        description="probability of the clean prediction after the attack (ranks prototypes)",
    )


register_task(RobustnessRequest, RobustnessResult)

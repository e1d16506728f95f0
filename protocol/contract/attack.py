"""``attack``: one image's adversarial example, its pictures, and optionally its explanation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract.explain import ExplainOptions, ExplainResult
from protocol.contract.parts import ClassScore, EncodedArray, ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class AttackRequest(Strict):
    task: Literal["attack"] = "attack"
    image: ImageData
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    explanation: ExplainOptions | None = Field(
        None,
        description="also explain the adversarial image [Stock2018, fig. 5]; the default "
        "target is its adversarial class",
    )
    adversarial_array: bool = Field(
        False, description="also return the adversarial image as float32 (the PNG has 8 bits)"
    )


class AttackResult(StampedResult):
    method: str
    params: dict[str, Any]
    original: ClassScore
    adversarial: ClassScore
    success: bool
    steps_to_flip: int | None
    linf: float
    l2: float
    adversarial_png: str
    png_prediction: ClassScore = Field(
        description="prediction of adversarial_png as delivered (8 bits per channel): what "
        "uploading it again gives; steps below half a level are partly lost in it"
    )
    perturbation_png: str
    adversarial_array: EncodedArray | None = Field(
        None, description="the exact adversarial image, float32 (3, H, W) in [0, 1], when asked"
    )
    explanation: ExplainResult | None = Field(
        None, description="the adversarial image explained [Stock2018, fig. 5], when asked"
    )


register_task(AttackRequest, AttackResult)

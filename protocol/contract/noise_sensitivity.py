"""``noise_sensitivity``: predictions with neural features' regions corrupted [Singla2022, §5]."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocol.contract.parts import ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class NoiseSensitivityRequest(Strict):
    """Predictions with the regions of neural features corrupted by Gaussian noise
    [Singla2022, §5, eqs. 1-2]: each feature alone, each group's union."""

    task: Literal["noise_sensitivity"] = "noise_sensitivity"
    images: list[ImageData] = Field(min_length=1)
    seeds: list[int] = Field(description="one noise seed per image")
    features: list[int] = Field(default_factory=list)
    groups: list[list[int]] = Field(default_factory=list)
    sigmas: list[float] = Field(min_length=1)


class NoiseSensitivityResult(StampedResult):
    sigmas: list[float]
    clean: list[int] = Field(description="predictions of the clean images")
    features: list[list[list[int]]] = Field(description="[feature][sigma][image] predictions")
    groups: list[list[list[int]]] = Field(description="[group][sigma][image] predictions")
    coverage: list[list[float]] = Field(description="[feature][image] mean of the feature's mask")


register_task(NoiseSensitivityRequest, NoiseSensitivityResult)

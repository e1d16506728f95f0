"""``class_features``: neural features' importance for each image's label [Singla2022, §3.2]."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocol.contract.parts import EncodedArray, ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class ClassFeaturesRequest(Strict):
    """Each image's penultimate-layer features and their importance for its label
    [Singla2022, §3.2]; a caller averages them over a class to rank its features."""

    task: Literal["class_features"] = "class_features"
    images: list[ImageData] = Field(min_length=1)
    labels: list[int] = Field(min_length=1)


class ClassFeaturesResult(StampedResult):
    importance: EncodedArray = Field(description="(N, C) each feature's importance for the label")
    values: EncodedArray = Field(description="(N, C) the features' values (mean activations)")
    predictions: list[int]


register_task(ClassFeaturesRequest, ClassFeaturesResult)

"""``predict``: the top classes of one image (batched across callers by the model server)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocol.contract.parts import ClassScore, ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class PredictRequest(Strict):
    task: Literal["predict"] = "predict"
    image: ImageData
    top_k: int = Field(5, ge=1)


class PredictResult(StampedResult):
    predictions: list[ClassScore]


register_task(PredictRequest, PredictResult)

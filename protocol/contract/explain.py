"""``explain``: one image's explanation by a named method, its pictures and optional APEM score."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract.parts import (
    ApemScore,
    ClassScore,
    EncodedArray,
    ImageData,
    ImageOutput,
    Stage,
    StampedResult,
    Strict,
)
from protocol.contract.registry import register_task


class ExplainOptions(Strict):
    """What to explain and how, apart from the image (an explain request, or the
    explanation an attack request asks for of its adversarial image)."""

    method: str
    target: int | None = Field(None, description="class to explain; default: the predicted class")
    params: dict[str, Any] = Field(default_factory=dict)
    stage: Stage = 2
    colormap: str = "inferno"
    outputs: list[ImageOutput] = Field(
        default_factory=lambda: ["relevance", "heatmap_png", "overlay_png"]
    )
    score: Literal["apem"] | None = None
    apem_params: dict[str, Any] = Field(default_factory=dict)


class ExplainRequest(ExplainOptions):
    task: Literal["explain"] = "explain"
    image: ImageData


class ExplainResult(StampedResult):
    method: str
    params: dict[str, Any]
    target: int
    stage: Stage
    prediction: ClassScore
    relevance: EncodedArray | None = None
    heatmap_png: str | None = None
    overlay_png: str | None = None
    attention_png: str | None = Field(
        None, description="LIME: the top superpixels shown; SIS: the sufficient subset shown"
    )
    path_png: str | None = Field(None, description="LIME: superpixels added one by one")
    extras: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's own numbers (LIME segments, weights and fit score; IG's "
        "completeness gap; LRP's logit and relevance sums; NAM's feature; SmoothGrad's noise; "
        "SIS's subset size, its confidence and the confidence with only keep_fraction of the "
        "pixels)",
    )
    apem: ApemScore | None = None


register_task(ExplainRequest, ExplainResult)

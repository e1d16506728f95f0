"""What the contract's tasks share: the base models, image and array transport, scores, errors.

Task modules (one per task, :mod:`protocol.contract`) build their request and result models
from these parts; nothing here names a task.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTRACT_VERSION = 1

TIME_LIMIT_HEADER = "X-Beyond-Time-Limit"
"""Request header: the seconds the caller waits for this call's answer. The handler stops
the work a little sooner (422 ``time_limit``) rather than compute for nobody."""


class Strict(BaseModel):
    """Every contract model: unknown fields are refused, so a misspelt option is an error."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EncodedArray(Strict):
    """A numpy array as base64 of its ``.npy`` serialisation."""

    encoding: Literal["npy-base64"] = "npy-base64"
    data: str
    shape: list[int]
    dtype: str = "float32"


class RawImage(Strict):
    """Decoded RGB8 pixels, row-major ``(height, width, 3)``: part ``part`` of a binary frame.

    Only the frame decoder (:func:`protocol.frames.decode_frame`) attaches ``pixels`` (as
    bytes; a JSON string is refused); it is never serialised, so in plain JSON a raw image
    is a reference without data.
    """

    width: int = Field(ge=1)
    height: int = Field(ge=1)
    part: int = Field(0, ge=0)
    pixels: bytes | None = Field(None, exclude=True, repr=False, strict=True)


ImageData = str | RawImage
"""A request image: base64 of an RGB PNG file, or a :class:`RawImage` in a binary frame."""


class ClassScore(Strict):
    class_index: int
    label: str
    probability: float


class ErrorDetail(Strict):
    code: str
    message: str


class ErrorBody(Strict):
    """What the handler returns, with a 4xx/5xx status, when a request cannot be served."""

    error: ErrorDetail


Stage = Literal[1, 2, 3]
"""Visualization stage [doValle2019, §4.2]: 1 raw 3-channel relevance, 2 absolute
value clamped at the 99th percentile and summed over channels, 3 stage 2 times the image."""

ImageOutput = Literal["relevance", "heatmap_png", "overlay_png", "attention_png", "path_png"]


class StampedResult(Strict):
    """A task's result, stamped with the model that computed it and the time it took."""

    model: str
    version: str
    elapsed_ms: float = Field(
        description="milliseconds: the model server's work; in the gateway's answers the whole "
        "request (upload, decoding, the model server)"
    )


# an APEM score [doValle2019, ch. 3]: the apem task's, or an explanation's
class ApemScore(Strict):
    eps_minus: float | None
    eps_plus: float | None
    apem: float | None
    apem_norm: float | None = None
    grid: dict[str, Any]
    approximate: bool = False
    params: dict[str, Any] = Field(
        default_factory=dict, description="APEM parameters used, defaults filled in"
    )

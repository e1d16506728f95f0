"""``embed``: penultimate-layer embeddings and class probabilities of a batch of images."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocol.contract.parts import EncodedArray, ImageData, StampedResult, Strict
from protocol.contract.registry import register_task


class EmbedRequest(Strict):
    """Penultimate-layer embeddings and class probabilities for a batch of images."""

    task: Literal["embed"] = "embed"
    images: list[ImageData] = Field(min_length=1)


class EmbedResult(StampedResult):
    embeddings: EncodedArray
    probabilities: EncodedArray


register_task(EmbedRequest, EmbedResult)

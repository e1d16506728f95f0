"""What the task runners share: refusals, request images as pixels, and the result stamp.

Errors a client can cause raise :class:`TaskError` with an HTTP-like status and a code;
the model server's adapter turns them into ``contract.ErrorBody`` replies.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import matplotlib
import torch
from PIL import Image

from handlers.explainers import Explanation, create_explainer
from handlers.models.classifier import ImageShapeError, preprocess
from handlers.models.derived import inference_logits
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.arrays import InvalidArray
from protocol.validation import (
    ClassOutOfRange,
    InvalidParameter,
    StrictParams,
    UnknownMethod,
    check_class_index,
    parse_params,
)

MAX_IMAGE_PIXELS = 40_000_000
MAX_BATCH_IMAGES = 256


class TaskError(Exception):
    """A request the runner refuses; ``status`` is the HTTP status an adapter should use."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> contract.ErrorBody:
        return contract.ErrorBody(error=contract.ErrorDetail(code=self.code, message=self.message))


@contextmanager
def refusals() -> Iterator[None]:
    """Turn the libraries' validation errors into 422 :class:`TaskError` s."""
    try:
        yield
    except UnknownMethod as error:
        raise TaskError(422, "unknown_method", str(error)) from None
    except InvalidArray as error:
        raise TaskError(422, "invalid_relevance", str(error)) from None
    except ClassOutOfRange as error:
        raise TaskError(422, error.code, str(error)) from None
    except InvalidParameter as error:
        raise TaskError(422, "bad_parameter", str(error)) from None


Params = TypeVar("Params", bound=StrictParams)


def checked(model: type[Params], values: dict[str, Any]) -> Params:
    """``values`` validated as ``model`` before any work is done for the request (422)."""
    with refusals():
        return parse_params(model, values)


def one_per_image(name: str, values: Sequence[Any], x: torch.Tensor) -> None:
    """422 unless ``values`` holds one entry per image of the batch ``x``."""
    if len(values) != x.shape[0]:
        raise TaskError(422, "bad_parameter", f"{name}: expected {x.shape[0]}, got {len(values)}")


def check_colormap(name: str) -> None:
    if name not in matplotlib.colormaps:
        raise TaskError(422, "bad_parameter", f"colormap: unknown matplotlib colormap {name!r}")


def png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- request images
def decode_image(data: str) -> Image.Image:
    """Base64 PNG (a JSON request's image) -> RGB PIL image, refusing anything else."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise TaskError(422, "invalid_image", "image is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise TaskError(413, "image_too_large", f"image has more than {MAX_IMAGE_PIXELS} pixels")
            return img.convert("RGB")
    except TaskError:
        raise
    except Exception:
        raise TaskError(422, "invalid_image", "image is not a decodable PNG") from None


def raw_image(image: contract.RawImage) -> Image.Image:
    """RGB8 pixels of a binary frame (``protocol.frames``) -> RGB PIL image, checked."""
    if image.pixels is None:
        raise TaskError(422, "invalid_image", "a raw image carries its pixels only in a binary frame")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise TaskError(413, "image_too_large", f"image has more than {MAX_IMAGE_PIXELS} pixels")
    if len(image.pixels) != image.width * image.height * 3:
        raise TaskError(422, "invalid_image", "the raw image's size does not match width x height x 3")
    return Image.frombuffer("RGB", (image.width, image.height), image.pixels, "raw", "RGB", 0, 1)


def request_image(image: contract.ImageData) -> Image.Image:
    return decode_image(image) if isinstance(image, str) else raw_image(image)


def tensor(served: ServedModel, image: contract.ImageData) -> torch.Tensor:
    """One request image as a ``(1, 3, S, S)`` pixel tensor on the model's device."""
    try:
        pixels = preprocess(request_image(image), served.spec.preprocessing)
    except ImageShapeError as error:
        raise TaskError(422, "invalid_image", str(error)) from None
    return pixels.unsqueeze(0).to(served.device)


def tensors(served: ServedModel, images: Sequence[contract.ImageData]) -> torch.Tensor:
    """A request's images as one ``(N, 3, S, S)`` batch (at most :data:`MAX_BATCH_IMAGES`)."""
    if len(images) > MAX_BATCH_IMAGES:
        raise TaskError(422, "bad_parameter", f"at most {MAX_BATCH_IMAGES} images per request")
    return torch.cat([tensor(served, image) for image in images])


def region_masks(served: ServedModel, name: str, masks: Sequence[contract.ImageData], x: torch.Tensor) -> torch.Tensor:
    """One mask image per image of ``x`` as ``(N, S, S)`` in [0, 1] (grey level = mask):
    through the model's own resizing and cropping, so each mask stays on its image."""
    one_per_image(name, masks, x)
    return tensors(served, masks).mean(dim=1)


# --------------------------------------------------------------------------- model answers
def checked_target(served: ServedModel, target: int | None, name: str = "target") -> torch.Tensor | None:
    """``target`` as a one-element class tensor (``None`` stays ``None``); 422
    ``invalid_target`` if out of the model's range (:func:`~protocol.validation.check_class_index`,
    the check the gateway makes too), before any work is done for the request."""
    if target is None:
        return None
    with refusals():
        check_class_index(name, target, served.spec.num_classes)
    return torch.tensor([target])


@torch.no_grad()
def probabilities(served: ServedModel, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities through the fused inference copy (the predict hot path)."""
    return torch.softmax(inference_logits(served.model, x), dim=1)


def explanation(served: ServedModel, x: torch.Tensor, method: str, params: dict[str, Any],
                target: int | None) -> Explanation:
    """``method``'s explanation of ``x`` for ``target`` (default: each image's prediction)."""
    targets = checked_target(served, target)
    with refusals():
        return create_explainer(method, params).explain(served.model, x, targets)


def class_score(served: ServedModel, index: int, probability: float) -> contract.ClassScore:
    return contract.ClassScore(class_index=index, label=served.spec.labels[index], probability=probability)


def stamp(served: ServedModel, start: float) -> dict[str, Any]:
    """The fields of ``contract.StampedResult``: the model, its version, ms since ``start``."""
    return {"model": served.spec.name, "version": served.spec.version,
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 3)}

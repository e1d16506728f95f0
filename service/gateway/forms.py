"""Parsing and checking of multipart form parts shared by the inference routers."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from typing import Any, TypeVar, get_args

import numpy as np
from fastapi import Request, UploadFile
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from protocol.contract import DescribeResult, EncodedArray, ImageOutput, RawImage
from protocol.params.attacks import PARAMS_BY_ATTACK, AttackParams
from protocol.validation import ClassOutOfRange, InvalidParameter, StrictParams, check_class_index
from protocol.validation import parse_params as validate_params
from service.errors import ApiError
from service.gateway.deps import ApiKey
from service.imaging import decode_rgb, header_pixels
from service.settings import Settings


async def _read_capped(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "payload_too_large", f"{what} exceeds the limit of {limit} bytes")
    return data


def _raw_image(data: bytes, max_pixels: int) -> RawImage:
    rgb = decode_rgb(data, max_pixels).rgb
    return RawImage(width=rgb.width, height=rgb.height, pixels=rgb.tobytes())


INLINE_DECODE_PIXELS = 512 * 512
"""Images up to this size are decoded on the event loop (about a millisecond at most): the
hop to a worker thread and back costs more than decoding a 256x256 JPEG. Larger ones, and
whatever the header cannot vouch for, are decoded in the thread pool."""


async def read_image(upload: UploadFile, settings: Settings) -> RawImage:
    """Validate and decode the uploaded image: its RGB8 pixels, sent on in a binary frame."""
    data = await _read_capped(upload, settings.max_upload_bytes, "the image")
    pixels = header_pixels(data)
    if pixels is not None and pixels <= INLINE_DECODE_PIXELS:
        return _raw_image(data, settings.max_image_pixels)
    return await run_in_threadpool(_raw_image, data, settings.max_image_pixels)


def _declared(dependant: Dependant) -> tuple[set[str], set[str]]:
    """Form field and query parameter names a dependant and its sub-dependants declare."""
    form = {field.alias for field in dependant.body_params}
    query = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        sub_form, sub_query = _declared(sub)
        form |= sub_form
        query |= sub_query
    return form, query


async def reject_stray_fields(request: Request, _: ApiKey) -> None:
    """422 ``unknown_field`` naming form fields or query parameters the route does not take,
    and 422 ``repeated_field`` naming a form field sent more than once.

    FastAPI ignores both (a stray field, or every copy of a field but the last), so a
    misspelt option (``target_class`` for ``target``) would silently give the default, and a
    second ``image`` one answer for two images; the client is told instead. Every form field
    of these routes takes one value. Runs after the API key check.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    form, query = _declared(route.dependant)  # a few microseconds
    sent = await request.form() if request.method == "POST" else {}  # parsed already: cached
    checks = (("form field", sent.keys(), form), ("query parameter", request.query_params, query))
    if sent:
        counts = Counter(name for name, _ in sent.multi_items())
        repeated = sorted(name for name, count in counts.items() if count > 1)
        if repeated:
            raise ApiError(
                422,
                "repeated_field",
                f"form field{'s' if len(repeated) > 1 else ''} {', '.join(map(repr, repeated))} "
                "sent more than once; this endpoint takes one of each (one image per request)",
            )
    for where, names, known in checks:
        unknown = sorted(set(names) - known)
        if unknown:
            raise ApiError(
                422,
                "unknown_field",
                f"unknown {where}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"this endpoint takes: {', '.join(sorted(known)) or 'none'}",
            )


def parse_params(text: str | None, field: str = "params") -> dict[str, Any]:
    """A form field holding a JSON object (absent or empty means ``{}``)."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(422, "invalid_params", f"`{field}` is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_params", f"`{field}` must be a JSON object")
    return value


P = TypeVar("P", bound=StrictParams)


def check_library_params(model: type[P], values: dict[str, Any], field: str) -> P:
    """``values`` validated as a library's torch-free parameter model (attacks, APEM,
    Explanation Filter), before any work is queued: 422 ``invalid_params`` naming the first
    bad value. The handler builds the method from the same model and the same values."""
    try:
        return validate_params(model, values)
    except InvalidParameter as exc:
        raise ApiError(422, "invalid_params", f"{field}.{exc}") from None


IMAGE_OUTPUTS: tuple[str, ...] = get_args(ImageOutput)


def parse_outputs(text: str | None) -> list[str] | None:
    """``outputs`` form field: comma-separated names of :data:`IMAGE_OUTPUTS` (None: default)."""
    if text is None or not text.strip():
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(IMAGE_OUTPUTS))
    if unknown:
        raise ApiError(
            422,
            "invalid_request",
            f"unknown outputs {', '.join(map(repr, unknown))}; known: {', '.join(IMAGE_OUTPUTS)}",
        )
    return list(dict.fromkeys(names))


def parse_attack_params(text: str | None, method: str) -> tuple[dict[str, Any], AttackParams]:
    """The ``params`` form field of an attack as sent (the library's names are the API's)
    and as ``method``'s parameter model (:data:`~protocol.params.attacks.PARAMS_BY_ATTACK`)
    checks it: 422 ``invalid_params`` for an unknown or bad value."""
    values = parse_params(text)
    return values, check_library_params(PARAMS_BY_ATTACK[method], values, "params")


def check_method(method: str, known: list[str], kind: str) -> None:
    if known and method not in known:
        raise ApiError(
            422, "unknown_method", f"unknown {kind} method {method!r}; known: {', '.join(known)}"
        )


def check_task(described: DescribeResult, task: str) -> None:
    """422 when the model's handler does not serve ``task`` (its ``describe`` lists them)."""
    if described.tasks and task not in described.tasks:
        raise ApiError(422, "unsupported_task", f"this model does not serve {task!r}")


def check_target(target: int | None, described: DescribeResult, field: str) -> None:
    """422 ``invalid_target`` for a class outside the model's ``describe``d classes, before
    any work is queued: :func:`~protocol.validation.check_class_index`, the handler's check
    of the same value, with its code and message."""
    if target is None:
        return
    try:
        check_class_index(field, target, int(described.spec["num_classes"]))
    except ClassOutOfRange as exc:
        raise ApiError(422, exc.code, str(exc)) from None


def _decode_npy(data: bytes) -> EncodedArray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise ApiError(422, "invalid_relevance", "`relevance` is not a valid .npy array") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise ApiError(422, "invalid_relevance", "`relevance` must be a numeric array")
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ApiError(
            422, "invalid_relevance", "`relevance` must be a 2-D (H, W) or 3-D (C, H, W) array"
        )
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ApiError(422, "invalid_relevance", "`relevance` has NaN or infinite values")
    out = io.BytesIO()
    np.save(out, arr, allow_pickle=False)
    return EncodedArray(data=base64.b64encode(out.getvalue()).decode(), shape=list(arr.shape))


async def read_relevance(upload: UploadFile, settings: Settings) -> EncodedArray:
    data = await _read_capped(upload, settings.max_upload_bytes, "the relevance file")
    return await run_in_threadpool(_decode_npy, data)

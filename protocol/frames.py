"""Binary frames: one contract request whose images travel as raw pixels, not base64 in JSON.

A frame is ``MAGIC | header length (u32) | part count (u32) | part lengths (u64 each) |
header | parts``, big-endian. The header is the request's JSON with every
:class:`~protocol.contract.RawImage` written as ``{"width", "height", "part"}``; part ``i``
holds that image's RGB8 pixels. The gateway has decoded and validated every upload already,
so a frame spares both sides the PNG encoding, base64 and a JSON string of the pixels:
CPU on both sides of every request (measured: docs/performance.md, run F). JSON bodies
stay valid; a body is a frame when it starts with :data:`MAGIC`, which no JSON text does.
Torch-free: the gateway imports it.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from pydantic import BaseModel

from protocol.contract import RawImage

MAGIC = b"BYF1"
MEDIA_TYPE = "application/x-beyond-frame"
MAX_MESSAGE_MB = 96
"""TorchServe's request and response cap (MiB). The gateway sends every image as RGB8
pixels in a frame, 3 bytes per pixel: its default limit of 25 MP is 75 MB (71.5 MiB) plus
a small JSON header. Raise both together (``BEYOND_MAX_IMAGE_PIXELS``)."""
_PREFIX = struct.Struct(">4sII")


class FrameError(ValueError):
    """The body starts like a frame but is not a well-formed one."""


def _with_parts(value: Any, parts: list[bytes]) -> Any:
    """``value`` with each RawImage renumbered to the part its pixels are appended as."""
    if isinstance(value, RawImage):
        if value.pixels is None:
            raise ValueError("a RawImage needs its pixels to be sent")
        parts.append(value.pixels)
        return value.model_copy(update={"part": len(parts) - 1})
    if isinstance(value, list):
        return [_with_parts(item, parts) for item in value]
    return value


def encode_request(request: BaseModel) -> tuple[bytes, str]:
    """``(body, content type)``: a frame when the request holds raw images, JSON otherwise."""
    parts: list[bytes] = []
    updates = {
        name: _with_parts(getattr(request, name), parts) for name in type(request).model_fields
    }
    if not parts:
        return request.model_dump_json(exclude_none=True).encode(), "application/json"
    header = request.model_copy(update=updates).model_dump_json(exclude_none=True).encode()
    lengths = struct.pack(f">{len(parts)}Q", *(len(p) for p in parts))
    prefix = _PREFIX.pack(MAGIC, len(header), len(parts))
    return b"".join([prefix, lengths, header, *parts]), MEDIA_TYPE


def is_frame(body: bytes | bytearray) -> bool:
    return body[: len(MAGIC)] == MAGIC


def _attach(value: Any, parts: list[bytes], used: set[int]) -> Any:
    """Give every ``{"part": i, ...}`` image reference of the header its pixels."""
    if isinstance(value, dict) and "part" in value and "width" in value:
        index = value["part"]
        if not isinstance(index, int) or not 0 <= index < len(parts) or index in used:
            raise FrameError(f"image part {index!r} is missing or used twice")
        used.add(index)
        return {**value, "pixels": parts[index]}
    if isinstance(value, list):
        return [_attach(item, parts, used) for item in value]
    return value


def decode_frame(body: bytes | bytearray) -> dict[str, Any]:
    """A frame -> the request as a dict whose raw images carry their pixels.

    Raises:
        FrameError: truncated, inconsistent lengths, a header that is not a JSON object, or
            image references that do not match the parts one to one.
    """
    if len(body) < _PREFIX.size:
        raise FrameError("the frame is truncated")
    magic, header_length, count = _PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise FrameError("not a frame")
    start = _PREFIX.size + 8 * count
    if start + header_length > len(body):
        raise FrameError("the frame is truncated")
    lengths = struct.unpack_from(f">{count}Q", body, _PREFIX.size)
    if start + header_length + sum(lengths) != len(body):
        raise FrameError("the part lengths do not add up to the frame's size")
    try:
        header = json.loads(bytes(body[start : start + header_length]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FrameError("the frame's header is not JSON") from None
    if not isinstance(header, dict):
        raise FrameError("the frame's header must be a JSON object")
    parts, offset = [], start + header_length
    for length in lengths:
        parts.append(bytes(body[offset : offset + length]))
        offset += length
    used: set[int] = set()
    request = {key: _attach(value, parts, used) for key, value in header.items()}
    if len(used) != len(parts):
        raise FrameError("the frame has parts no image refers to")
    return request

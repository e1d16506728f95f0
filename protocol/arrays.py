"""float32 numpy arrays as base64 ``.npy`` (the contract's :class:`EncodedArray`).

Decoding never unpickles (``allow_pickle=False``), checks the declared dtype and shape
against the payload, and can insist on an expected shape.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError

from protocol.contract import EncodedArray

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class InvalidArray(ValueError):
    """An encoded array that cannot be accepted (the handler answers 422)."""


def encode_array(array: Any) -> EncodedArray:
    """Encode an array (numpy, torch tensor or nested lists) as float32 base64 ``.npy``."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    values = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return EncodedArray(
        data=base64.b64encode(buffer.getvalue()).decode("ascii"),
        shape=list(values.shape),
        dtype="float32",
    )


def decode_array(
    encoded: EncodedArray | Mapping[str, Any],
    shape: Sequence[int | None] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Decode an :class:`EncodedArray` into a float32 numpy array.

    Args:
        encoded: The encoded array (model or plain mapping).
        shape: Expected shape; ``None`` entries match any size.
        max_bytes: Largest accepted decoded payload.

    Raises:
        InvalidArray: Malformed base64 or ``.npy``, a pickled/object payload, a dtype other
            than float32, a shape that differs from the declared or expected one, or
            non-finite values.
    """
    try:
        encoded = EncodedArray.model_validate(encoded)
    except ValidationError as err:
        raise InvalidArray(f"not an encoded array: {err.errors()[0]['msg']}") from None
    if len(encoded.data) > (max_bytes * 4) // 3 + 4:
        raise InvalidArray(f"encoded array is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(encoded.data, validate=True)
        values = np.load(io.BytesIO(raw), allow_pickle=False)
    except (binascii.Error, ValueError, OSError, EOFError) as err:
        raise InvalidArray(f"not a base64 .npy array without pickles: {err}") from None
    if values.dtype != np.float32 or encoded.dtype != "float32":
        raise InvalidArray(f"dtype must be float32, got {values.dtype} (declared {encoded.dtype})")
    if list(values.shape) != list(encoded.shape):
        raise InvalidArray(f"payload shape {list(values.shape)} differs from declared {encoded.shape}")
    if shape is not None and not _shape_matches(values.shape, shape):
        raise InvalidArray(f"shape {list(values.shape)} does not match expected {list(shape)}")
    if not np.isfinite(values).all():
        raise InvalidArray("array contains NaN or infinite values")
    return values


def _shape_matches(actual: Sequence[int], expected: Sequence[int | None]) -> bool:
    return len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected, strict=True))

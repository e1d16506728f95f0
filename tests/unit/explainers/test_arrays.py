"""Base64 .npy arrays: round trip, and what decoding refuses."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from protocol.arrays import InvalidArray, decode_array, encode_array
from protocol.contract import EncodedArray


def test_round_trip_numpy_and_torch() -> None:
    values = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    encoded = encode_array(values)
    assert isinstance(encoded, EncodedArray)
    assert encoded.shape == [2, 3, 4] and encoded.dtype == "float32"
    np.testing.assert_array_equal(decode_array(encoded), values)
    np.testing.assert_array_equal(decode_array(encoded.model_dump(), shape=(None, 3, 4)), values)
    from_torch = encode_array(torch.from_numpy(values).double())
    np.testing.assert_array_equal(decode_array(from_torch), values)


def _encoded(array: np.ndarray, allow_pickle: bool = False, **fields) -> dict:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return {"data": base64.b64encode(buffer.getvalue()).decode(), "shape": list(array.shape), **fields}


def test_refuses_pickles() -> None:
    payload = _encoded(np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidArray, match="pickle"):
        decode_array(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_encoded(np.zeros((2, 2), np.float64)), "float32"),
        (_encoded(np.zeros((2, 2), np.float32), dtype="float64"), "float32"),
        ({**_encoded(np.zeros((2, 2), np.float32)), "shape": [4]}, "declared"),
        ({"data": "not base64!!", "shape": [1]}, "base64"),
        ({"data": base64.b64encode(b"garbage").decode(), "shape": [1]}, "npy"),
        (_encoded(np.array([np.nan], np.float32)), "NaN"),
        ({"shape": [1]}, "not an encoded array"),
    ],
)
def test_refuses_malformed_payloads(payload: dict, message: str) -> None:
    with pytest.raises(InvalidArray, match=message):
        decode_array(payload)


def test_expected_shape_and_size_limit() -> None:
    encoded = encode_array(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InvalidArray, match="expected"):
        decode_array(encoded, shape=(1, 3, 8, 9))
    with pytest.raises(InvalidArray, match="expected"):
        decode_array(encoded, shape=(3, 8, 8))
    with pytest.raises(InvalidArray, match="larger"):
        decode_array(encoded, max_bytes=64)

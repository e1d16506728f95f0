"""The gateway's uncompressed canonical PNG: pixel-exact, standard, and what predict sends."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from service.imaging import decode_image, png_stored


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (256, 256), (700, 300)])
def test_png_stored_round_trips(size: tuple[int, int]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    data = png_stored(Image.fromarray(pixels))
    with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
        assert img.mode == "RGB" and img.size == size and not img.info
        assert np.array_equal(np.asarray(img), pixels)
    idat = data[data.index(b"IDAT") + 4 :]
    raw = zlib.decompressobj().decompress(idat)
    assert len(raw) >= size[1] * (3 * size[0] + 1)  # stored: no compression


def test_level_zero_is_the_same_image() -> None:
    out = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), (10, 200, 90), np.uint8)).save(out, format="JPEG")
    fast, small = decode_image(out.getvalue(), 10**6, 0), decode_image(out.getvalue(), 10**6)
    assert (fast.width, fast.height, fast.source_format) == (30, 40, "JPEG")
    a = np.asarray(Image.open(io.BytesIO(fast.png)))
    b = np.asarray(Image.open(io.BytesIO(small.png)))
    assert np.array_equal(a, b)

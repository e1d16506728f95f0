from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import ApiError
from service.imaging import decode_image, sniff_format


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def decoded(data: bytes) -> Image.Image:
    result = decode_image(data, 1_000_000)
    img = Image.open(io.BytesIO(result.png))
    assert img.format == "PNG" and img.mode == "RGB"
    return img


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"])
def test_modes_become_rgb(mode: str) -> None:
    assert decoded(encode(Image.new(mode, (7, 5)))).size == (7, 5)


def test_cmyk_jpeg_and_webp_and_bmp() -> None:
    assert decoded(encode(Image.new("CMYK", (4, 4)), "JPEG")).size == (4, 4)
    assert decoded(encode(Image.new("RGB", (4, 4)), "WEBP")).size == (4, 4)
    assert decoded(encode(Image.new("RGB", (4, 4)), "BMP")).size == (4, 4)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    arr = np.full((3, 3), 65535, dtype=np.uint16)
    img = decoded(encode(Image.fromarray(arr)))
    assert np.asarray(img).min() == 255


def test_rgba_transparent_composited_on_white() -> None:
    img = decoded(encode(Image.new("RGBA", (2, 2), (0, 0, 0, 0))))
    assert np.asarray(img).min() == 255


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (3, 3), (80 * i, 0, 0)) for i in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    result = decode_image(data, 100)
    assert result.frames == 3 and result.width == 3


def test_one_pixel() -> None:
    assert decoded(encode(Image.new("RGB", (1, 1)))).size == (1, 1)


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (6, 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    assert decoded(encode(img, "JPEG", exif=exif.tobytes())).size == (2, 6)


def test_metadata_and_trailing_bytes_dropped() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("secret", "x" * 100)
    data = encode(Image.new("RGB", (3, 3)), pnginfo=info) + b"TRAILING-PAYLOAD"
    png = decode_image(data, 100).png
    assert b"secret" not in png and b"TRAILING" not in png


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 422, "empty_image"),
        (b"hello, not an image", 415, "unsupported_image_format"),
        (b"II*\x00" + b"\x00" * 20, 415, "unsupported_image_format"),  # TIFF: not accepted
    ],
)
def test_rejections(data: bytes, status: int, code: str) -> None:
    with pytest.raises(ApiError) as err:
        decode_image(data, 100)
    assert (err.value.status, err.value.code) == (status, code)


def test_truncated() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ApiError) as err:
        decode_image(data[: len(data) // 2], 10_000)
    assert err.value.status == 422


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + b"\x00" * 16
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 16)
        + idat
        + struct.pack(">I", zlib.crc32(idat))
    )


def test_pixel_limit_from_header_before_decoding() -> None:
    # a header declaring 100k x 100k pixels and no pixel data at all
    with pytest.raises(ApiError) as err:
        decode_image(_png_header_only(100_000, 100_000), 25_000_000)
    assert err.value.status == 413 and err.value.code == "image_too_large"


def test_sniff_ignores_name_and_type() -> None:
    assert sniff_format(encode(Image.new("RGB", (1, 1)), "JPEG")) == "JPEG"
    assert sniff_format(b"<svg></svg>") is None

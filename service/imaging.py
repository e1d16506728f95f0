"""Defensive image decoding: untrusted bytes in, canonical RGB PNG bytes out.

The format is recognised by its signature (never by Content-Type or file name) and only
that one Pillow plugin is offered the bytes. The pixel count is checked from the header
before any pixel is decoded, Pillow's decompression-bomb warning is an error, EXIF
orientation is applied, and what leaves is freshly encoded pixels: no metadata, no
trailing bytes, no extra frames.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ApiError

# signature -> Pillow format name. TIFF and the rarer formats are deliberately absent.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
)
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

# Process-wide and thread-safe (unlike a per-call ``catch_warnings``): a bomb is an error.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class CanonicalImage:
    """A validated image as canonical RGB PNG bytes and what we learnt decoding it."""

    png: bytes
    width: int
    height: int
    source_format: str
    source_mode: str
    frames: int


def sniff_format(data: bytes) -> str | None:
    """The accepted format these bytes start with, or ``None``."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, offset, name in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_stored(rgb: Image.Image) -> bytes:
    """An RGB image as a PNG without compression: filter type 0 on every row and stored
    deflate blocks. Standard PNG (any decoder reads it), about 10x faster to write than
    Pillow's encoder, which filters every row even at compress level 0."""
    pixels = np.asarray(rgb, dtype=np.uint8)
    height, width = pixels.shape[:2]
    rows = np.zeros((height, width * 3 + 1), dtype=np.uint8)  # leading 0: filter "None"
    rows[:, 1:] = pixels.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 0))
        + _chunk(b"IEND", b"")
    )


def decode_image(data: bytes, max_pixels: int, compress_level: int = 1) -> CanonicalImage:
    """Validate untrusted image bytes and re-encode them as canonical RGB PNG.

    ``compress_level`` 0 (:func:`png_stored`, no deflate) is for images that only travel to
    TorchServe: for a 256x256 JPEG it cuts the gateway's CPU per request from 6.3 ms to
    about 1 ms for 1.7x the bytes on the loopback; stored images keep level 1.

    Raises :class:`ApiError` (415 unsupported format, 413 too many pixels, 422 empty,
    truncated or corrupt) and never lets a Pillow exception escape.
    """
    if not data:
        raise ApiError(422, "empty_image", "the image is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(
            415,
            "unsupported_image_format",
            f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})",
        )
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ApiError(422, "invalid_image", "the image has no pixels")
            if width * height > max_pixels:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"{width}x{height} pixels exceeds the limit of {max_pixels} pixels",
                )
            frames = int(getattr(img, "n_frames", 1) or 1)
            source_mode = img.mode
            img.seek(0)
            img.load()
            oriented = ImageOps.exif_transpose(img)
            rgb = _to_rgb(oriented)
            if compress_level == 0:
                png = png_stored(rgb)
            else:
                out = io.BytesIO()
                rgb.save(out, format="PNG", compress_level=compress_level)
                png = out.getvalue()
            final_w, final_h = rgb.size
    except ApiError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ApiError(
            413, "image_too_large", "the image exceeds the decompression limit"
        ) from None
    except (UnidentifiedImageError, SyntaxError, EOFError):
        raise ApiError(422, "invalid_image", f"the {fmt} data cannot be decoded") from None
    except (OSError, ValueError, TypeError, IndexError, KeyError, MemoryError) as exc:
        reason = "truncated or corrupt" if "truncated" in str(exc).lower() else "corrupt"
        raise ApiError(422, "invalid_image", f"the {fmt} image is {reason}") from None
    return CanonicalImage(png, final_w, final_h, fmt, source_mode, frames)

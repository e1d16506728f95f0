"""Defensive image decoding: untrusted bytes in, canonical RGB pixels out.

The format is recognised by its signature (never by Content-Type or file name) and only
that one Pillow plugin is offered the bytes. The pixel count is checked from the header
before any pixel is decoded, Pillow's decompression-bomb warning is an error, EXIF
orientation is applied, and what leaves is fresh pixels: no metadata, no trailing bytes,
no extra frames. :func:`decode_rgb` gives them as RGB8 pixels (what the inference routes
send to TorchServe in a binary frame); :func:`decode_image` as a canonical PNG file (what
is stored and what travels inside JSON).
"""

from __future__ import annotations

import io
import warnings
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
class DecodedImage:
    """A validated image as RGB pixels and what we learnt decoding it."""

    rgb: Image.Image
    source_format: str
    source_mode: str
    frames: int

    @property
    def width(self) -> int:
        return self.rgb.width

    @property
    def height(self) -> int:
        return self.rgb.height


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


def header_pixels(data: bytes) -> int | None:
    """Width x height from the image's header alone (no pixel decoded), or ``None`` when
    the bytes are not an accepted image (:func:`decode_rgb` then says why)."""
    fmt = sniff_format(data)
    if fmt is None:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            return img.width * img.height
    except Exception:  # noqa: BLE001 - any failure is decode_rgb's to report
        return None


def decode_rgb(data: bytes, max_pixels: int) -> DecodedImage:
    """Validate untrusted image bytes and decode them to RGB pixels (EXIF orientation applied).

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
            ImageOps.exif_transpose(img, in_place=True)  # no copy when nothing to turn
            rgb = _to_rgb(img)
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
    return DecodedImage(rgb, fmt, source_mode, frames)


def decode_image(data: bytes, max_pixels: int) -> CanonicalImage:
    """Validate untrusted image bytes and re-encode them as a canonical RGB PNG file.

    Raises what :func:`decode_rgb` raises.
    """
    decoded = decode_rgb(data, max_pixels)
    out = io.BytesIO()
    decoded.rgb.save(out, format="PNG", compress_level=1)
    return CanonicalImage(
        out.getvalue(),
        decoded.width,
        decoded.height,
        decoded.source_format,
        decoded.source_mode,
        decoded.frames,
    )

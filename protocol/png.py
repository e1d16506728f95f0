"""RGB arrays as PNG bytes (numpy and Pillow only: the torch-free jobs use it too)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(rgb: np.ndarray) -> bytes:
    """``(H, W, 3)`` float in [0, 1] (or uint8), or ``(H, W)`` grey, as PNG bytes."""
    array = np.asarray(rgb)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()

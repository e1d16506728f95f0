"""How many images one model pass may hold: a client's ``batch_size`` capped by pixels.

``batch_size`` is a speed knob: every method gives the same answer for any value (the
explainers' and APEM's tests check batch against one by one). The cap therefore changes no
answer; it keeps one request's pass within the memory a host can give, whatever a client
asks for: at most :data:`MAX_PIXELS_PER_PASS` input pixels per pass, 256 images of 224x224
(resnet18 keeps about 6 GB of activations for a forward and backward pass of that size) or
3,136 of the demo models' 64x64.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_PIXELS_PER_PASS = 256 * 224 * 224
MAX_BATCH_SIZE = 4096
"""The largest ``batch_size`` (or maps per batch) a request may name, before the pixel cap."""


def images_per_pass(batch_size: int, image_shape: Sequence[int]) -> int:
    """``batch_size`` capped at :data:`MAX_PIXELS_PER_PASS` pixels of ``(..., H, W)`` images."""
    height, width = image_shape[-2], image_shape[-1]
    return max(1, min(batch_size, MAX_PIXELS_PER_PASS // max(1, height * width)))

"""The thesis's visualization pipeline and the PNG renderings of explanations.

Stages ([doValle2019, §4.2], and [doValle2019, §4.4, fig. 4.6] for the three steps):

1. the raw 3-channel relevance;
2. ``|R|`` clamped at its 99th percentile and summed over channels;
3. the clamped ``|R|`` multiplied by the image's pixel values, then summed over channels
   (the "map multiplied by the original image", after [Smilkov2017]).

Every stage ends normalised to [0, 1] per image. Rendering turns a stage map into PNG bytes:
a colormapped heatmap, an overlay on the image, LIME's "image with attention" [Stock2018,
§2] and its explanation path [Stock2018, fig. 12].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import matplotlib
import numpy as np
import torch
from torch import Tensor

from protocol.png import png_bytes

Stage = Literal[1, 2, 3]
STAGES: tuple[Stage, ...] = (1, 2, 3)


# --------------------------------------------------------------------------- stages
def _unit_range(maps: Tensor) -> Tensor:
    """Min-max normalise each map of a batch to [0, 1] (constant maps become 0)."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, *([1] * (maps.dim() - 1)))
    span = (flat.amax(dim=1).view_as(low) - low).clamp(min=torch.finfo(maps.dtype).tiny)
    return (maps - low) / span


def clamp_percentile(values: Tensor, q: float = 0.99) -> Tensor:
    """Clamp each sample of a batch at its own ``q`` quantile (over all its entries)."""
    upper = torch.quantile(values.flatten(1).float(), q, dim=1).to(values.dtype)
    return torch.minimum(values, upper.view(-1, *([1] * (values.dim() - 1))))


def to_stage(relevance: Tensor, image: Tensor, stage: int) -> Tensor:
    """Map relevance to a visualization stage, normalised to [0, 1] [doValle2019, §4.2].

    Args:
        relevance: ``(B, C, H, W)`` (or ``(C, H, W)``) relevance.
        image: The explained images in [0, 1], same shape (used by stage 3).
        stage: 1, 2 or 3 (see the module docstring).

    Returns:
        Stage 1: ``(B, C, H, W)`` with zero relevance at 0.5 (``R / (2 max|R|) + 0.5``, so the
        sign stays visible). Stages 2 and 3: ``(B, H, W)``, min-max normalised.

    Raises:
        ValueError: Unknown stage, or shapes that do not match.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    single = relevance.dim() == 3
    relevance = (relevance.unsqueeze(0) if single else relevance).detach().float()
    image = (image.unsqueeze(0) if image.dim() == 3 else image).detach().float()
    if relevance.shape != image.shape:
        raise ValueError(f"relevance {tuple(relevance.shape)} and image {tuple(image.shape)} differ")
    if stage == 1:
        peak = relevance.abs().flatten(1).amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        out = relevance / (2 * peak.view(-1, 1, 1, 1)) + 0.5
    else:
        clamped = clamp_percentile(relevance.abs())
        if stage == 3:
            clamped = clamped * image.to(clamped.device)
        out = _unit_range(clamped.sum(dim=1))
    return out[0] if single else out


# --------------------------------------------------------------------------- rendering
def _to_hwc(image: Tensor | np.ndarray) -> np.ndarray:
    """An image as ``(H, W, 3)`` float in [0, 1] from ``(3, H, W)`` tensors or HWC arrays."""
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    array = array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array, 0.0, 1.0)


def colorize(stage_map: Tensor | np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """A ``(H, W)`` map in [0, 1] through a matplotlib colormap; ``(3, H, W)`` maps pass as RGB.

    Raises:
        ValueError: ``colormap`` is not a matplotlib colormap name.
    """
    values = stage_map.detach().cpu().numpy() if isinstance(stage_map, Tensor) else np.asarray(stage_map)
    if values.ndim == 3:
        return _to_hwc(values.transpose(1, 2, 0) if values.shape[0] == 3 else values)
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(f"unknown colormap {colormap!r}") from None
    return cmap(np.clip(values, 0.0, 1.0))[..., :3]


def heatmap_png(stage_map: Tensor | np.ndarray, colormap: str = "inferno") -> bytes:
    """The stage map as a colormapped PNG (stage 1 maps are shown as RGB)."""
    return png_bytes(colorize(stage_map, colormap))


def overlay_png(
    stage_map: Tensor | np.ndarray,
    image: Tensor | np.ndarray,
    colormap: str = "inferno",
    opacity: float = 0.5,
) -> bytes:
    """The colormapped map blended over the image [Singla2022, App. A.2]."""
    heat = colorize(stage_map, colormap)
    base = _to_hwc(image)
    return png_bytes((1 - opacity) * base + opacity * heat)


def ranked_superpixels(weights: Sequence[float], k: int, positive_only: bool = True) -> list[int]:
    """Indices of the ``k`` superpixels with the largest weights (optionally only positive)."""
    order = np.argsort(-np.asarray(weights, dtype=np.float64), kind="stable")
    if positive_only:
        order = [i for i in order if weights[i] > 0]
    return [int(i) for i in order[:k]]


def reveal(image: Tensor | np.ndarray, segments: np.ndarray, shown: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """The image with only the ``shown`` superpixels visible, the rest set to ``fill``."""
    base = _to_hwc(image)
    visible = np.isin(np.asarray(segments), np.asarray(list(shown), dtype=np.int64))
    return np.where(visible[..., None], base, fill)


def attention_png(
    image: Tensor | np.ndarray,
    segments: np.ndarray,
    weights: Sequence[float],
    k: int = 8,
    fill: float = 0.0,
) -> bytes:
    """LIME's image "with attention": only the top-K positive superpixels shown [Stock2018, §2]."""
    return png_bytes(reveal(image, segments, ranked_superpixels(weights, k), fill))


def subset_png(image: Tensor | np.ndarray, mask: np.ndarray, fill: float = 0.0) -> bytes:
    """The image with only the pixels of a binary ``(H, W)`` mask shown (a sufficient subset)."""
    return png_bytes(reveal(image, mask, [1], fill))


def path_png(
    image: Tensor | np.ndarray,
    segments: np.ndarray,
    weights: Sequence[float],
    k: int = 8,
    fill: float = 0.0,
    gap: int = 2,
) -> bytes:
    """The explanation path [Stock2018, fig. 12] as a horizontal strip.

    Panel ``i`` reveals the top ``i`` superpixels by weight (positive ones, up to ``k``), so
    the strip has one panel per revealed superpixel, separated by ``gap`` white columns.
    """
    ranked = ranked_superpixels(weights, k)
    base = _to_hwc(image)
    panels = [reveal(base, segments, ranked[: i + 1], fill) for i in range(len(ranked))]
    if not panels:
        panels = [reveal(base, segments, [], fill)]
    spacer = np.ones((base.shape[0], gap, 3))
    strip = [part for panel in panels for part in (panel, spacer)][:-1]
    return png_bytes(np.concatenate(strip, axis=1))

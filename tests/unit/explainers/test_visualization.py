"""The thesis's three visualization stages and the PNG renderings."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.visualization import (
    attention_png,
    heatmap_png,
    overlay_png,
    path_png,
    ranked_superpixels,
    to_stage,
)


def _decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    relevance = torch.randn(2, 3, 10, 12, generator=generator)
    image = torch.rand(2, 3, 10, 12, generator=generator)
    return relevance, image


def test_stage_shapes_and_ranges() -> None:
    relevance, image = _inputs()
    one = to_stage(relevance, image, 1)
    assert one.shape == (2, 3, 10, 12)
    for stage in (2, 3):
        out = to_stage(relevance, image, stage)
        assert out.shape == (2, 10, 12)
        assert out.amin((1, 2)).tolist() == [0.0, 0.0]
        assert out.amax((1, 2)).tolist() == pytest.approx([1.0, 1.0])
    assert to_stage(relevance[0], image[0], 2).shape == (10, 12)


def test_stage_one_keeps_the_sign_around_one_half() -> None:
    relevance, image = _inputs()
    one = to_stage(relevance, image, 1)
    assert one.min() >= 0 and one.max() <= 1
    torch.testing.assert_close(one - 0.5, relevance / (2 * relevance.abs().amax((1, 2, 3), keepdim=True)))
    assert to_stage(torch.zeros(1, 3, 4, 4), torch.rand(1, 3, 4, 4), 1).eq(0.5).all()


def test_stage_two_is_clamped_abs_summed_over_channels() -> None:
    relevance, image = _inputs()
    relevance[0, 1, 3, 3] = -1e6  # one outlier must not flatten the rest of the map
    clamped = relevance.abs().clone()
    for b in range(2):
        upper = torch.quantile(clamped[b].flatten(), 0.99)
        clamped[b] = clamped[b].clamp(max=upper)
    summed = clamped.sum(1)
    low, high = summed.amin((1, 2), keepdim=True), summed.amax((1, 2), keepdim=True)
    torch.testing.assert_close(to_stage(relevance, image, 2), (summed - low) / (high - low))
    assert to_stage(relevance, image, 2)[0].median() > 0.2


def test_stage_three_multiplies_by_the_image() -> None:
    relevance, image = _inputs()
    image[:, :, :, :4] = 0.0  # black pixels carry no stage-3 relevance
    three = to_stage(relevance, image, 3)
    assert three[:, :, :4].eq(0).all() and three[:, :, 4:].gt(0).any()
    constant = to_stage(relevance, torch.ones_like(image), 3)
    torch.testing.assert_close(constant, to_stage(relevance, image.fill_(1.0), 2))


def test_bad_stage_and_shapes() -> None:
    relevance, image = _inputs()
    with pytest.raises(ValueError, match="stage"):
        to_stage(relevance, image, 4)
    with pytest.raises(ValueError, match="differ"):
        to_stage(relevance, image[:, :, :5], 2)


def test_heatmap_and_overlay_pngs() -> None:
    relevance, image = _inputs()
    stage2 = to_stage(relevance, image, 2)[0]
    heat = _decode(heatmap_png(stage2, "viridis"))
    assert heat.shape == (10, 12, 3)
    assert not np.array_equal(heat, _decode(heatmap_png(stage2, "gray")))
    assert _decode(heatmap_png(to_stage(relevance, image, 1)[0])).shape == (10, 12, 3)
    over = _decode(overlay_png(stage2, image[0], "jet", opacity=0.0))
    np.testing.assert_array_equal(over, np.round(image[0].permute(1, 2, 0).numpy() * 255))
    with pytest.raises(ValueError, match="colormap"):
        heatmap_png(stage2, "no-such-map")


def _segments() -> np.ndarray:
    return np.repeat(np.arange(4), 3)[None, :].repeat(10, axis=0)  # 4 vertical bands of 3 columns


def test_attention_image_shows_only_the_top_k_positive_superpixels() -> None:
    image = np.full((10, 12, 3), 200, dtype=np.uint8)
    weights = [0.1, -0.5, 0.7, 0.0]
    shown = _decode(attention_png(image, _segments(), weights, k=8))
    visible = shown[0, :, 0] == 200
    assert visible.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    top1 = _decode(attention_png(image, _segments(), weights, k=1))
    assert (top1[0, :, 0] == 200).tolist() == [False] * 6 + [True] * 3 + [False] * 3


def test_explanation_path_strip() -> None:
    image = np.full((10, 12, 3), 200, dtype=np.uint8)
    weights = [0.1, 0.3, 0.7, -0.2]
    assert ranked_superpixels(weights, 8) == [2, 1, 0]
    strip = _decode(path_png(image, _segments(), weights, k=8, gap=2))
    assert strip.shape == (10, 3 * 12 + 2 * 2, 3)
    panels = [strip[:, i * 14 : i * 14 + 12, 0] for i in range(3)]
    revealed = [int((panel[0] == 200).sum()) for panel in panels]
    assert revealed == [3, 6, 9]

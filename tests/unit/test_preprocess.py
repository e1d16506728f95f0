"""The handler's preprocessing: resize the shorter side, centre crop; extreme shapes refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from handlers.models.classifier import MAX_RESIZED_PIXELS, ImageShapeError, preprocess
from protocol.spec import Preprocessing

IMAGENET_LIKE = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_resize_then_centre_crop() -> None:
    pixels = np.zeros((300, 600, 3), dtype=np.uint8)
    pixels[:, 290:310] = 255  # a white band in the middle of a 600 x 300 image
    out = preprocess(Image.fromarray(pixels), IMAGENET_LIKE)
    assert out.shape == (3, 224, 224) and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0
    # 600 x 300 -> 512 x 256, crop from x = 144: the band lands on columns 103.5 to 120.5
    columns = out[0].mean(dim=0)
    assert float(columns[106:118].min()) == 1.0
    assert float(columns[:100].max()) == 0.0 and float(columns[125:].max()) == 0.0


def test_extreme_aspect_ratios_are_refused_before_resizing() -> None:
    thin = Image.new("RGB", (1_000_000, 4))  # 4 MP, but 64,000,000 x 256 once resized
    with pytest.raises(ImageShapeError, match="1000000x4 image") as error:
        preprocess(thin, IMAGENET_LIKE)
    assert str(MAX_RESIZED_PIXELS) in str(error.value)
    wide_but_fine = Image.new("RGB", (20_000, 200))  # 25,600 x 256 once resized
    assert preprocess(wide_but_fine, IMAGENET_LIKE).shape == (3, 224, 224)

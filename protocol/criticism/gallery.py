"""PNG encoding and the prototypes/criticisms gallery (numpy and Pillow only, no torch).

The gallery mirrors [Stock2018, figs. 7-8]: prototypes in the first row, criticisms in the
second, each tile captioned with its index and score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from protocol.criticism.methods import SelectedItem, Selection
from protocol.png import png_bytes

_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_CAPTION_H = 12
_LABEL_W = 72
_PAD = 4

ImageSet = np.ndarray | Mapping[int, np.ndarray]


def _caption(item: SelectedItem, score_name: str) -> str:
    if item.score is None:
        value = "never" if score_name == "steps_to_flip" else "-"
    elif float(item.score).is_integer():
        value = str(int(item.score))
    else:
        value = f"{item.score:.3g}"
    return f"#{item.index} {value}"


def _row(
    canvas: Image.Image,
    top: int,
    label: str,
    items: Sequence[SelectedItem],
    images: ImageSet,
    tile: int,
    score_name: str,
) -> None:
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, top + tile // 2), label, fill=_INK)
    for col, item in enumerate(items):
        left = _LABEL_W + col * (tile + _PAD)
        picture = Image.fromarray(np.asarray(images[item.index], dtype=np.uint8))
        canvas.paste(picture.resize((tile, tile), Image.Resampling.NEAREST), (left, top))
        draw.text((left, top + tile + 1), _caption(item, score_name), fill=_INK)


def gallery_png(images: ImageSet, selection: Selection, tile: int = 96) -> bytes:
    """Render prototypes (top row) and criticisms (bottom row) of ``selection``.

    Args:
        images: ``(n, H, W, 3)`` uint8 images of the whole set the selection indexes, or a
            mapping from index to ``(H, W, 3)`` uint8 image holding at least the chosen ones.
        selection: the output of a selection method.
        tile: side of each tile in pixels (images are resized with nearest neighbour).

    Returns:
        PNG bytes.
    """
    columns = max(len(selection.prototypes), len(selection.criticisms), 1)
    row_h = tile + _CAPTION_H + _PAD
    width = _LABEL_W + columns * (tile + _PAD)
    canvas = Image.new("RGB", (width, _CAPTION_H + 2 * row_h), _BACKGROUND)
    ImageDraw.Draw(canvas).text((_PAD, 0), f"{selection.method} ({selection.score_name})", fill=_INK)
    _row(canvas, _CAPTION_H, "prototypes", selection.prototypes, images, tile, selection.score_name)
    _row(canvas, _CAPTION_H + row_h, "criticisms", selection.criticisms, images, tile, selection.score_name)
    return png_bytes(np.asarray(canvas))

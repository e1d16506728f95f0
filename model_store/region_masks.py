"""A generated Spurious Shapes split as a dataset with region masks, ready to upload.

``python -m model_store.region_masks model_store/data/spurious-shapes/test`` writes the
split's ground truth as the service's region masks beside its images:
``_masks/core/<class>/<index>.png`` (the shape) for every image and
``_masks/spurious/<class>/<index>.png`` (the planted background) where there is one, white
on black. ``python -m service.client upload <split>`` then uploads images and masks as one
dataset, and the ``audit`` job reports core and spurious accuracy against them
([Singla2022, §5.1, def. 2]). The split's own ``metadata.jsonl`` and ``.npy`` files are
skipped by the upload (reported, not stored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from service.datasets import MASK_KINDS, MASKS_FOLDER


def write_region_masks(split_dir: Path) -> dict[str, int]:
    """Write the split's masks as PNGs under ``split_dir / _masks``; count them per kind."""
    files = [json.loads(line)["file"] for line in (split_dir / "metadata.jsonl").read_text().splitlines()]
    width = Image.open(split_dir / files[0]).width
    written = dict.fromkeys(MASK_KINDS, 0)
    for kind in MASK_KINDS:
        packed = np.load(split_dir / f"{kind}_masks.npy")
        for file, row in zip(files, packed, strict=True):
            mask = np.unpackbits(row, axis=-1, count=width).astype(bool)
            if kind == "spurious" and not mask.any():
                continue  # no planted background: nothing spurious to annotate
            target = split_dir / MASKS_FOLDER / kind / file
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(target)
            written[kind] += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split_dir", type=Path, help="e.g. model_store/data/spurious-shapes/test")
    args = parser.parse_args()
    print(json.dumps(write_region_masks(args.split_dir)))


if __name__ == "__main__":
    main()

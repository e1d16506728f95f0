"""The Spurious Shapes generator: determinism, aligned masks, planted rates."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from model_store.shapes import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOURS,
    ShapesConfig,
    background_texture,
    generate,
    load_split,
    render,
    sample_attributes,
)

SMALL = {"train": 300, "test": 60, "counterfactual": 60}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_different_seed_different_bytes(tmp_path: Path) -> None:
    a = generate(ShapesConfig(sizes=SMALL), tmp_path / "a", workers=2, chunk=70)
    b = generate(ShapesConfig(sizes=SMALL), tmp_path / "b", workers=1, chunk=500)
    c = generate(ShapesConfig(sizes=SMALL, seed=1), tmp_path / "c")
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_the_same_bytes_without_the_wider_simd_kernels(tmp_path: Path) -> None:
    """The shipped demo weights are only the models their claims were measured on if every
    machine renders the same data: numpy with its widest kernels switched off one level at a
    time (on an AVX-512 CPU: as on an AMD EPYC with AVX2 only, then its baseline) renders
    the same bytes as with every kernel this CPU has."""
    import os
    import subprocess
    import sys

    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    here = generate(ShapesConfig(sizes=SMALL), tmp_path / "here")
    script = "import sys; from pathlib import Path; from model_store.shapes import ShapesConfig, generate; " \
             f"generate(ShapesConfig(sizes={SMALL!r}), Path(sys.argv[1]))"
    available = [feature for feature in __cpu_dispatch__ if __cpu_features__.get(feature)]
    if not available:
        pytest.skip("numpy dispatches no wider kernel on this CPU")
    for level in range(len(available)):
        disabled = " ".join(available[level:])
        out = tmp_path / f"without-{level}"
        env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled}
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True)
        assert _digest(out) == _digest(here), disabled


def test_imagefolder_layout_and_metadata(tmp_path: Path) -> None:
    root = generate(ShapesConfig(sizes=SMALL), tmp_path / "d")
    split = load_split(root, "test")
    assert split.images.shape == (60, 64, 64, 3) and split.images.dtype == np.uint8
    for attrs in split.attributes:
        assert (root / "test" / str(attrs["file"])).exists()
        assert str(attrs["file"]).startswith(f"{attrs['class_name']}/")
        assert CLASS_NAMES[int(attrs["label"])] == attrs["class_name"]


def test_core_mask_is_exactly_the_drawn_shape() -> None:
    config = ShapesConfig()
    for index in range(40):
        attrs = sample_attributes(config, "train", index)
        image, core = render(attrs, 64)
        background = background_texture(str(attrs["background"]), 64, int(attrs["texture_seed"]))
        background = np.clip(background, 0, 255).astype(np.uint8)
        changed = np.any(image != background, axis=-1)
        # every pixel outside the mask is untouched background; inside it is painted
        assert not changed[~core].any()
        assert changed[core].mean() > 0.95
        assert 0.02 < core.mean() < 0.5


def test_spurious_mask_marks_background_only_when_planted(tmp_path: Path) -> None:
    root = generate(ShapesConfig(sizes=SMALL), tmp_path / "e")
    split = load_split(root, "train")
    for i, attrs in enumerate(split.attributes):
        if attrs["planted_background"]:
            assert np.array_equal(split.spurious_masks[i], ~split.core_masks[i])
        else:
            assert not split.spurious_masks[i].any()


@pytest.mark.parametrize("p", [0.95, 0.7])
def test_planted_background_rate(p: float) -> None:
    config = ShapesConfig(background_p=p)
    draws = [sample_attributes(config, "train", i) for i in range(6000)]
    for cls, kind in config.planted_backgrounds.items():
        of_class = [d for d in draws if d["class_name"] == cls]
        rate = np.mean([d["background"] == kind for d in of_class])
        assert abs(rate - p) < 0.03, (cls, rate)
        # the planted background of a class is rare in the other classes
        others = [d for d in draws if d["class_name"] != cls]
        assert np.mean([d["background"] == kind for d in others]) < 0.05
    counterfactual = [sample_attributes(config, "counterfactual", i) for i in range(6000)]
    circles = [d for d in counterfactual if d["class_name"] == "circle"]
    rate = np.mean([d["background"] == "sky" for d in circles])
    assert abs(rate - 1 / len(BACKGROUNDS)) < 0.04


def test_planted_colour_common_in_class_rare_elsewhere() -> None:
    config = ShapesConfig()
    cls, colour = config.planted_colour  # type: ignore[misc]
    draws = [sample_attributes(config, "train", i) for i in range(6000)]
    in_class = np.mean([d["colour"] == colour for d in draws if d["class_name"] == cls])
    elsewhere = np.mean([d["colour"] == colour for d in draws if d["class_name"] != cls])
    assert abs(in_class - config.colour_p_in_class) < 0.04
    assert elsewhere < 0.05
    assert all(
        d["planted_colour"] == (d["class_name"] == cls and d["colour"] == colour) for d in draws
    )


def test_fair_config_has_no_planted_correlation() -> None:
    config = ShapesConfig.fair()
    draws = [sample_attributes(config, "train", i) for i in range(6000)]
    circles = [d for d in draws if d["class_name"] == "circle"]
    assert abs(np.mean([d["background"] == "sky" for d in circles]) - 1 / len(BACKGROUNDS)) < 0.04
    stars = [d for d in draws if d["class_name"] == "star"]
    assert abs(np.mean([d["colour"] == "magenta" for d in stars]) - 1 / len(COLOURS)) < 0.04
    assert not any(d["planted_background"] or d["planted_colour"] for d in draws)


def test_faint_shapes_blend_into_their_background_and_full_opacity_is_unchanged() -> None:
    """``opacity`` 0.6: the shape's pixels are 60 % its colour and 40 % the background; the
    background is untouched; full-opacity configs keep their attributes (no ``opacity`` key)
    and so their bytes."""
    full = sample_attributes(ShapesConfig(planted_backgrounds={}), "test", 3)
    faint = sample_attributes(ShapesConfig.faint(), "test", 3)
    assert "opacity" not in full and faint == {**full, "opacity": 0.6}
    solid, mask = render(full, 64)
    blended, same_mask = render(faint, 64)
    background = background_texture(str(full["background"]), 64, int(full["texture_seed"]))
    expected = 0.6 * solid[mask].astype(np.float64) + 0.4 * np.clip(background[mask], 0, 255)
    unclipped = (solid[mask] < 255).all(axis=1)  # the solid shape's colour is clipped at 255
    assert np.array_equal(mask, same_mask) and unclipped.sum() > 100
    assert np.abs(blended[mask] - expected)[unclipped].max() <= 1.0  # uint8 rounding (twice)
    assert np.array_equal(blended[~mask], solid[~mask])

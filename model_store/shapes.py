"""Spurious Shapes: a synthetic image-classification dataset whose answers we know.

One foreground shape per image (the class) on a textured background. Two planted
correlations give the demo models something to be caught relying on:

* **backgrounds**: for some classes one background kind co-occurs with the class with
  probability ``p`` (default 0.95), like the spurious features of Salient ImageNet
  [Singla2022] - a model can learn "sky" instead of "circle";
* **colour**: within one class, a foreground colour that is common in that class and rare
  in every other one - the mirror of the ``basketball`` finding of [Stock2018, §3.4],
  where a group over-represented in one class relative to the others becomes
  prototypical for it.

Every image comes with its ground truth: label, core mask (the shape's pixels), spurious
mask (the background pixels when the background is the planted one) and attributes.
Rendering is a pure function of the attributes, so a test can re-render an image with
another background (a counterfactual) and compare predictions.

Layout on disk (ImageFolder plus metadata)::

    <root>/dataset.json                      configuration, classes, counts
    <root>/<split>/<class_name>/<index>.png
    <root>/<split>/metadata.jsonl            one JSON object per image, in index order
    <root>/<split>/core_masks.npy            np.packbits(bool (N, H, W), axis=-1)
    <root>/<split>/spurious_masks.npy        same layout
"""

from __future__ import annotations

import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring")
BACKGROUNDS = ("sky", "grass", "sand", "stripes", "water")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "magenta": (225, 40, 215),
}
SPLIT_IDS = {"train": 0, "test": 1, "counterfactual": 2}


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate. The defaults are the biased ("spurious") demo dataset.

    Attributes:
        planted_backgrounds: class -> background kind planted for it.
        background_p: probability of the planted background for its class (train and
            test splits; the counterfactual split draws backgrounds independently).
        planted_colour: ``(class, colour)`` common in that class, rare elsewhere.
        colour_p_in_class: share of the planted class drawn in the planted colour.
        colour_p_elsewhere: share of every other class drawn in the planted colour.
        opacity: share of the shape's colour in its pixels, the rest the background showing
            through. Below 1 the class's evidence is faint, and a model trained on it is as
            easily flipped as [Stock2018]'s ImageNet ResNet (:meth:`faint`).
    """

    image_size: int = 64
    seed: int = 0
    sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 12000, "test": 3000, "counterfactual": 3000}
    )
    planted_backgrounds: dict[str, str] = field(
        default_factory=lambda: {"circle": "sky", "square": "grass", "triangle": "stripes"}
    )
    background_p: float = 0.95
    planted_colour: tuple[str, str] | None = ("star", "magenta")
    colour_p_in_class: float = 0.5
    colour_p_elsewhere: float = 0.03
    opacity: float = 1.0

    @classmethod
    def fair(cls, **overrides: object) -> ShapesConfig:
        """The control: no planted background and no planted colour."""
        base: dict[str, object] = {
            "planted_backgrounds": {},
            "planted_colour": None,
            "sizes": {"train": 12000, "test": 3000},
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def faint(cls, **overrides: object) -> ShapesConfig:
        """Shapes at 60 % opacity with the planted colour and no planted background.

        Small margins, as on natural images: IFGSM with [Stock2018, §3.2]'s parameters (step
        0.001, M = 10) flips about nine in ten of its model's correct test images, as it did
        for the paper's ImageNet ResNet-101 (accuracy 77.31 % -> 7.96 %), against 3-29 %
        for the full-opacity demo models; so adversarial criticism with the paper's own
        parameters spreads a class over one to ten steps, and the planted colour
        ([Stock2018, §3.4] mirrored) shows in who flips late.
        """
        base: dict[str, object] = {"planted_backgrounds": {}, "opacity": 0.6, "sizes": {"train": 12000, "test": 3000}}
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sampling
def _background_probabilities(config: ShapesConfig, class_name: str, split: str) -> np.ndarray:
    kinds = list(BACKGROUNDS)
    probs = np.full(len(kinds), 1.0 / len(kinds))
    if split == "counterfactual" or not config.planted_backgrounds:
        return probs
    planted = set(config.planted_backgrounds.values())
    if class_name in config.planted_backgrounds:
        own = kinds.index(config.planted_backgrounds[class_name])
        probs[:] = (1.0 - config.background_p) / (len(kinds) - 1)
        probs[own] = config.background_p
    else:
        # unplanted classes never borrow another class's planted background
        free = [i for i, k in enumerate(kinds) if k not in planted]
        probs[:] = 0.0
        probs[free] = 1.0 / len(free)
    return probs


def _colour_probabilities(config: ShapesConfig, class_name: str) -> np.ndarray:
    names = list(COLOURS)
    probs = np.full(len(names), 1.0 / len(names))
    if config.planted_colour is None:
        return probs
    planted_class, planted_colour = config.planted_colour
    j = names.index(planted_colour)
    share = config.colour_p_in_class if class_name == planted_class else config.colour_p_elsewhere
    probs[:] = (1.0 - share) / (len(names) - 1)
    probs[j] = share
    return probs


def sample_attributes(config: ShapesConfig, split: str, index: int) -> dict[str, object]:
    """Draw one image's attributes; a pure function of (seed, split, index)."""
    rng = np.random.default_rng([config.seed, SPLIT_IDS[split], index, GENERATOR_VERSION])
    label = int(rng.integers(len(CLASS_NAMES)))
    class_name = CLASS_NAMES[label]
    background = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=_background_probabilities(config, class_name, split))]
    colour = list(COLOURS)[rng.choice(len(COLOURS), p=_colour_probabilities(config, class_name))]
    size = config.image_size
    radius = float(rng.uniform(0.16, 0.30) * size)
    margin = radius + 1
    planted_bg = config.planted_backgrounds.get(class_name) == background
    planted_colour = config.planted_colour is not None and config.planted_colour == (class_name, colour)
    return {
        "index": index,
        "label": label,
        "class_name": class_name,
        "background": background,
        "colour": colour,
        "colour_jitter": [int(v) for v in rng.integers(-20, 21, size=3)],
        "cx": float(rng.uniform(margin, size - margin)),
        "cy": float(rng.uniform(margin, size - margin)),
        "radius": radius,
        "rotation": float(rng.uniform(0, 2 * math.pi)),
        "texture_seed": int(rng.integers(2**31 - 1)),
        "planted_background": bool(planted_bg),
        "planted_colour": bool(planted_colour),
        **({"opacity": config.opacity} if config.opacity != 1.0 else {}),
    }


# ----------------------------------------------------------------------------- drawing
def _polygon(cx: float, cy: float, radii: list[float], rotation: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * i / n), cy + r * math.sin(rotation + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def _cross_polygon(cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    a = 0.36 * r  # half width of the bars
    pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def shape_mask(class_name: str, size: int, cx: float, cy: float, radius: float, rotation: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    r = radius
    if class_name in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if class_name == "ring":
            ri = 0.55 * r
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif class_name == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, rotation), fill=255)
    elif class_name == "triangle":
        draw.polygon(_polygon(cx, cy, [1.15 * r] * 3, rotation), fill=255)
    elif class_name == "star":
        draw.polygon(_polygon(cx, cy, [1.15 * r, 0.45 * r] * 5, rotation), fill=255)
    elif class_name == "cross":
        draw.polygon(_cross_polygon(cx, cy, r, rotation), fill=255)
    else:
        raise ValueError(f"unknown shape {class_name!r}")
    return np.asarray(canvas) > 0


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    n = size // cell + 2
    coarse = rng.random((n, n)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size + cell, size + cell), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)[:size, :size] / 255.0


def background_texture(kind: str, size: int, seed: int) -> np.ndarray:
    """A (size, size, 3) float32 texture in [0, 255] of background ``kind``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    fine = rng.normal(0, 1, (size, size)).astype(np.float32)
    if kind == "sky":
        top = np.array([70, 130, 215], np.float32)
        bottom = np.array([175, 210, 245], np.float32)
        t = (yy + 0.15 * _smooth_noise(rng, size, 16))[..., None]
        img = top * (1 - t) + bottom * t + 3 * fine[..., None]
    elif kind == "grass":
        blades = _smooth_noise(rng, size, 2)
        img = np.array([40, 120, 35], np.float32) + (blades[..., None] - 0.5) * np.array([50, 90, 40], np.float32)
        img += 8 * fine[..., None]
    elif kind == "sand":
        dunes = _smooth_noise(rng, size, 12)
        img = np.array([205, 180, 130], np.float32) + (dunes[..., None] - 0.5) * 40 + 10 * fine[..., None]
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(5, 10)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * size / period
        band = (np.floor(phase + rng.random()) % 2)[..., None]
        img = np.array([95, 95, 105], np.float32) * band + np.array([150, 150, 160], np.float32) * (1 - band)
        img += 4 * fine[..., None]
    elif kind == "water":
        waves = np.sin(yy * size / rng.uniform(2.5, 4.5) + 3 * _smooth_noise(rng, size, 8))[..., None]
        img = np.array([20, 90, 100], np.float32) + waves * np.array([10, 25, 25], np.float32) + 5 * fine[..., None]
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img


def render(attributes: dict[str, object], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one image from its attributes: ``(uint8 (size, size, 3), core mask bool)``."""
    a = attributes
    mask = shape_mask(str(a["class_name"]), size, float(a["cx"]), float(a["cy"]), float(a["radius"]), float(a["rotation"]))  # type: ignore[arg-type]
    img = background_texture(str(a["background"]), size, int(a["texture_seed"]))  # type: ignore[arg-type]
    colour = np.clip(np.array(COLOURS[str(a["colour"])], np.float32) + np.array(a["colour_jitter"], np.float32), 0, 255)
    shade = 1.0 + 0.08 * (_smooth_noise(np.random.default_rng(int(a["texture_seed"]) + 1), size, 8) - 0.5)  # type: ignore[arg-type]
    shape = colour[None, :] * shade[mask][:, None]
    opacity = float(a.get("opacity", 1.0))  # type: ignore[arg-type]
    img[mask] = shape if opacity == 1.0 else opacity * shape + (1.0 - opacity) * img[mask]
    return np.clip(img, 0, 255).astype(np.uint8), mask


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- writing
def _render_chunk(args: tuple[ShapesConfig, str, int, int, str]) -> tuple[list[dict[str, object]], np.ndarray, np.ndarray]:
    config, split, start, stop, out_dir = args
    size = config.image_size
    metas, cores, spurs = [], [], []
    for index in range(start, stop):
        attrs = sample_attributes(config, split, index)
        image, core = render(attrs, size)
        spurious = ~core if attrs["planted_background"] else np.zeros_like(core)
        rel = f"{attrs['class_name']}/{index:05d}.png"
        (Path(out_dir) / rel).write_bytes(png_bytes(image))
        metas.append({"file": rel, **attrs})
        cores.append(np.packbits(core, axis=-1))
        spurs.append(np.packbits(spurious, axis=-1))
    return metas, np.stack(cores), np.stack(spurs)


def generate(config: ShapesConfig, root: Path, workers: int = 2, chunk: int = 500) -> Path:
    """Write every split of ``config`` under ``root`` (deterministic: same seed, same bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in config.sizes.items():
        split_dir = root / split
        for name in CLASS_NAMES:
            (split_dir / name).mkdir(parents=True, exist_ok=True)
        jobs = [(config, split, s, min(s + chunk, n), str(split_dir)) for s in range(0, n, chunk)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
        with open(split_dir / "metadata.jsonl", "w") as f:
            for metas, _, _ in parts:
                for meta in metas:
                    f.write(json.dumps(meta, sort_keys=True) + "\n")
        np.save(split_dir / "core_masks.npy", np.concatenate([p[1] for p in parts]))
        np.save(split_dir / "spurious_masks.npy", np.concatenate([p[2] for p in parts]))
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "class_names": list(CLASS_NAMES),
        "backgrounds": list(BACKGROUNDS),
        "colours": list(COLOURS),
    }
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return root


# ----------------------------------------------------------------------------- reading
@dataclass
class ShapesSplit:
    """One split in memory: images ``uint8 (N, H, W, 3)`` plus ground truth."""

    images: np.ndarray
    labels: np.ndarray
    core_masks: np.ndarray
    spurious_masks: np.ndarray
    attributes: list[dict[str, object]]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | list[int]) -> ShapesSplit:
        idx = np.asarray(indices)
        return ShapesSplit(
            self.images[idx], self.labels[idx], self.core_masks[idx], self.spurious_masks[idx],
            [self.attributes[i] for i in idx], self.class_names,
        )


def load_split(root: Path, split: str) -> ShapesSplit:
    split_dir = root / split
    attributes = [json.loads(line) for line in (split_dir / "metadata.jsonl").read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(split_dir / a["file"]).convert("RGB")) for a in attributes])
    size = images.shape[1]
    core = np.unpackbits(np.load(split_dir / "core_masks.npy"), axis=-1, count=size).astype(bool)
    spurious = np.unpackbits(np.load(split_dir / "spurious_masks.npy"), axis=-1, count=size).astype(bool)
    labels = np.array([a["label"] for a in attributes], dtype=np.int64)
    return ShapesSplit(images, labels, core, spurious, attributes, list(CLASS_NAMES))


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Generate the Spurious Shapes dataset.")
    parser.add_argument("root", type=Path)
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--fair", action="store_true", help="no planted correlations (control)")
    variant.add_argument("--faint", action="store_true", help="shapes at 60%% opacity, planted colour only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--p", type=float, default=0.95, help="planted background probability")
    parser.add_argument("--train", type=int, default=12000)
    parser.add_argument("--test", type=int, default=3000)
    parser.add_argument("--counterfactual", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sizes = {"train": args.train, "test": args.test}
    if not (args.fair or args.faint):
        sizes["counterfactual"] = args.counterfactual
    common = {"seed": args.seed, "image_size": args.size, "sizes": sizes}
    if args.fair or args.faint:
        config = (ShapesConfig.fair if args.fair else ShapesConfig.faint)(**common)
    else:
        config = ShapesConfig(background_p=args.p, **common)
    start = time.perf_counter()
    generate(config, args.root, workers=args.workers)
    print(f"wrote {sum(sizes.values())} images to {args.root} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

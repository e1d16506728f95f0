"""The served classifier: [0, 1] pixel-space input, normalisation inside the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from handlers.models.architectures import SplitNetwork, build_architecture
from protocol.spec import ModelSpec, Preprocessing

SPEC_FILE = "model_spec.json"
WEIGHTS_FILE = "weights.pt"


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a module, so it is part of the differentiated graph."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PixelClassifier(nn.Module):
    """A :class:`SplitNetwork` that takes images in [0, 1] and normalises them itself.

    Callers (explainers, attacks, metrics) never pre-normalise: the gradient with respect to
    the input is a gradient with respect to pixels, and attack budgets are in pixel units.
    """

    def __init__(self, network: SplitNetwork, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.normalize = Normalize(preprocessing.mean, preprocessing.std)
        self.network = network

    @property
    def features(self) -> nn.Module:
        """The last convolutional block (Grad-CAM's and NAM's layer)."""
        return self.network.features

    @property
    def head(self) -> nn.Module:
        return self.network.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map ``(B, C, h, w)`` for pixel input ``x``."""
        return self.network.features(self.normalize(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding: the global average of the last feature map."""
        return self.feature_map(x).mean(dim=(2, 3))


def build_classifier(spec: ModelSpec, state_dict: dict[str, torch.Tensor] | None) -> PixelClassifier:
    """Rebuild a classifier; without a state dict its random weights are seeded (reproducible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train_seed or 0)
        network = build_architecture(spec.architecture, spec.num_classes, state_dict)
    return PixelClassifier(network, spec.preprocessing).eval()


def save_model_dir(directory: Path, spec: ModelSpec, network: SplitNetwork) -> None:
    """Write ``model_spec.json`` and ``weights.pt`` (SplitNetwork layout) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(spec.model_dump_json(indent=2))


def load_model_dir(directory: Path, device: str | torch.device = "cpu") -> tuple[PixelClassifier, ModelSpec]:
    """Load a model written by :func:`save_model_dir` (or unpacked from an archive)."""
    spec = ModelSpec.model_validate_json((directory / SPEC_FILE).read_text())
    weights = directory / WEIGHTS_FILE
    state_dict = torch.load(weights, map_location="cpu", weights_only=True) if weights.exists() else None
    if state_dict is None and not spec.random_weights:
        raise FileNotFoundError(f"{weights} is missing and the spec does not ask for random weights")
    return build_classifier(spec, state_dict).to(device), spec


MAX_RESIZED_PIXELS = 25_000_000
"""Largest intermediate image :func:`preprocess` builds. An image within the gateway's pixel
limit can still have an extreme aspect ratio: 5,000,000 x 5 pixels resized to a shorter side
of 64 is 64,000,000 x 64 (12 GB), enough to take a worker down."""


class ImageShapeError(ValueError):
    """The image cannot be preprocessed for this model (its aspect ratio is too extreme)."""


def preprocess(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """RGB PIL image -> ``(3, crop, crop)`` float tensor in [0, 1] (resize shorter side, centre crop).

    Raises:
        ImageShapeError: the resized image would exceed :data:`MAX_RESIZED_PIXELS`.
    """
    image = image.convert("RGB")
    w, h = image.size
    scale = preprocessing.resize / min(w, h)
    if (w, h) != (preprocessing.resize, preprocessing.resize) or scale != 1:
        new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if new_size[0] * new_size[1] > MAX_RESIZED_PIXELS:
            raise ImageShapeError(
                f"a {w}x{h} image resized to a shorter side of {preprocessing.resize} would be "
                f"{new_size[0]}x{new_size[1]} pixels, over {MAX_RESIZED_PIXELS}: "
                "crop it to a less extreme aspect ratio"
            )
        if new_size != (w, h):
            image = image.resize(new_size, Image.Resampling.BILINEAR)
    w, h = image.size
    c = preprocessing.crop
    left, top = (w - c) // 2, (h - c) // 2
    image = image.crop((left, top, left + c, top + c))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)

"""The served model: one classifier and its derived copies, built once when a worker starts.

:meth:`ServedModel.build` derives the fused inference copy (predictions, embeddings, and
the input gradients of the attacks and gradient explainers) and LRP's canonized copy before
the first request, so that request does not pay for deep copies, batch norm folding and the
copies' checks. The explainers, attacks and metrics take the served ``model`` and reach the
copies through :mod:`handlers.models.derived`, which hands out these same copies (it keeps
them per network, rebuilt only when a weight changes in place); the served model itself is
never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from handlers.explainers.lrp_core import canonized
from handlers.models.classifier import PixelClassifier, load_model_dir
from handlers.models.derived import fused_classifier
from protocol.spec import ModelSpec


@dataclass(frozen=True)
class ServedModel:
    """What a worker serves: the model, its spec and device, and the copies derived from it."""

    model: PixelClassifier
    spec: ModelSpec
    device: torch.device
    inference: nn.Module
    """The fused inference copy: pixels in, logits out, batch norm folded, with autograd."""
    lrp: nn.Module
    """LRP's canonized copy of ``model.network`` (batch norm merged, rule-aware layers)."""

    @classmethod
    def build(cls, model: PixelClassifier, spec: ModelSpec, device: torch.device) -> ServedModel:
        """Derive both copies of ``model``, each checked on one fixed random image.

        Raises:
            RuntimeError: A copy does not compute the model's function (an architecture
                whose batch norms are not where registration order says).
        """
        size = spec.preprocessing.crop
        generator = torch.Generator().manual_seed(0)
        probe = torch.rand(1, 3, size, size, generator=generator).to(device)
        with torch.no_grad():
            normalized = model.normalize(probe)
        return cls(model, spec, device, fused_classifier(model, probe), canonized(model.network, normalized))

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> ServedModel:
        """The model of a model directory (or unpacked archive), built for ``device``."""
        model, spec = load_model_dir(directory, device)
        return cls.build(model, spec, device)

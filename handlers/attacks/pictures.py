"""Pictures of an attack: the adversarial image and the amplified perturbation ([Stock2018,
fig. 5] shows them beside the explanation of the adversarial image for its new class)."""

from __future__ import annotations

from typing import Any

import torch

from protocol.png import png_bytes


def _hwc(image: torch.Tensor) -> Any:
    return image.detach().cpu().permute(1, 2, 0).numpy()


def adversarial_png(adversarial: torch.Tensor) -> bytes:
    """A ``(3, H, W)`` adversarial image in [0, 1] as PNG bytes."""
    return png_bytes(_hwc(adversarial.clamp(0.0, 1.0)))


def as_delivered(adversarial: torch.Tensor) -> torch.Tensor:
    """What :func:`adversarial_png` stores: pixels rounded to 8 bits per channel.

    Steps below half an 8-bit level ([Stock2018, §3.2]'s 0.001 is a quarter of one) are partly lost
    in the PNG, so an image that flipped may not flip once saved; the service reports the
    prediction of this rounded image beside the exact one.
    """
    return torch.round(adversarial.clamp(0.0, 1.0) * 255) / 255


def perturbation_png(clean: torch.Tensor, adversarial: torch.Tensor, amplify: float | None = None) -> bytes:
    """The perturbation ``adversarial - clean`` made visible: ``0.5 + amplify * delta``.

    Args:
        clean: ``(3, H, W)`` clean image.
        adversarial: ``(3, H, W)`` adversarial image.
        amplify: gain; by default the largest ``|delta|`` is mapped to 0 or 1 (mid grey is
            no change). A zero perturbation gives a uniform grey picture.
    """
    delta = (adversarial - clean).detach()
    peak = float(delta.abs().max())
    gain = amplify if amplify is not None else (0.5 / peak if peak > 0 else 0.0)
    return png_bytes(_hwc((0.5 + gain * delta).clamp(0.0, 1.0)))

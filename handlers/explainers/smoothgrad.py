"""SmoothGrad: the mean of another explainer's maps over noisy copies of the input."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from handlers.deadline import check_time
from handlers.explainers.base import (
    Attribution,
    Explainer,
    get_explainer,
    register,
)
from protocol.budget import images_per_pass
from protocol.params.explainers import SmoothGradParams

NOISE_BLOCK = 16
"""SmoothGrad draws its noise this many copies at a time (part of the documented order)."""


class NoiseBlocks:
    """Standard normal noise for copies ``0 .. n-1``, drawn in blocks, handed out in order."""

    def __init__(self, images: Tensor, n: int, seed: int) -> None:
        self.images, self.left = images, n
        self.generator = torch.Generator(device=images.device).manual_seed(seed)
        self.buffer = images.new_empty((0, *images.shape))

    def take(self, m: int) -> Tensor:
        """The next ``m`` copies' noise, ``(m, B, C, H, W)``."""
        parts = []
        while m > 0:
            if len(self.buffer) == 0:
                size = min(NOISE_BLOCK, self.left)
                self.left -= size
                self.buffer = torch.randn(
                    (size, *self.images.shape), generator=self.generator,
                    device=self.images.device, dtype=self.images.dtype,
                )
            parts.append(self.buffer[:m])
            m -= len(parts[-1])
            self.buffer = self.buffer[len(parts[-1]) :]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@register("smoothgrad")
class SmoothGrad(Explainer):
    """``M̂_c(x) = 1/n Σ_k M_c(x + N(0, σ²))`` ([doValle2019, §4.2.1]; [Smilkov2017]).

    ``M_c`` is the wrapped explainer (the gradient by default). The noise standard deviation
    is ``σ = sigma · (max(x) - min(x))`` per image ([Smilkov2017]'s "noise level").

    Noise order (fixed, so results do not depend on ``batch_size``): a local generator seeded
    with ``seed`` draws blocks of :data:`NOISE_BLOCK` copies,
    ``torch.randn((min(NOISE_BLOCK, n - k0), B, C, H, W))`` for ``k0 = 0, 16, 32, ...``;
    copy ``k`` of image ``b`` is ``x_b + σ_b · noise[k, b]``. Each pass holds
    ``m · B`` noisy images, ``m = max(1, batch_size // B)``.
    """

    Params = SmoothGradParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        p = self.params
        self.inner = get_explainer(p.base)(p.base_params)

    def network_for(self, model: nn.Module, images: Tensor) -> nn.Module:
        """What the wrapped explainer runs."""
        return self.inner.network_for(model, images)

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Average the wrapped explainer's relevance over the noisy copies, in batched passes."""
        p = self.params
        if targets is None:  # the clean images' classes; given ones are checked by the wrapped explainer
            targets = self.predicted_targets(model, images, targets)
        batch = images.shape[0]
        flat = images.flatten(1)
        std = p.sigma * (flat.amax(dim=1) - flat.amin(dim=1))
        std = std.view(-1, *([1] * (images.dim() - 1)))
        noise = NoiseBlocks(images, p.n, p.seed)
        copies_per_pass = max(1, images_per_pass(p.batch_size, images.shape) // batch)
        total = torch.zeros_like(images)
        for start in range(0, p.n, copies_per_pass):
            check_time("SmoothGrad")
            m = min(copies_per_pass, p.n - start)
            noisy = (images.unsqueeze(0) + std * noise.take(m)).flatten(0, 1)
            part = self.inner.attribute(model, noisy, targets.repeat(m))
            total += part.relevance.view(m, *images.shape).sum(dim=0)
        extras = {"noise_std": std.flatten().tolist()}
        return Attribution(total / p.n, part.targets[:batch], extras)

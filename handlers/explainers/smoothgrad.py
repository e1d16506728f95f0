"""SmoothGrad: the mean of another explainer's maps over noisy copies of the input."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from handlers.explainers.base import (
    Attribution,
    BatchedParams,
    Explainer,
    InvalidParameter,
    StochasticParams,
    UnknownMethod,
    get_explainer,
    parse_params,
    register,
)


class SmoothGradParams(StochasticParams, BatchedParams):
    """SmoothGrad parameters (thesis 003, section 4.2.1; the thesis uses n=100, sigma=0.2)."""

    n: int = Field(100, ge=1, description="number of noisy copies per image")
    sigma: float = Field(
        0.2, ge=0.0, description="noise standard deviation as a fraction of the image's value range"
    )
    base: str = Field("gradient", description="explainer averaged over the noisy copies")
    base_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("base")
    @classmethod
    def _smoothable(cls, base: str) -> str:
        try:
            explainer = get_explainer(base)
        except UnknownMethod as err:
            raise ValueError(str(err)) from None
        if not explainer.smoothable:
            raise ValueError(f"SmoothGrad cannot wrap {base!r}")
        return base

    @field_validator("base_params")
    @classmethod
    def _resolve_base_params(cls, raw: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "base" not in info.data:
            return raw
        try:
            resolved = parse_params(get_explainer(info.data["base"]).Params, raw)
        except InvalidParameter as err:
            raise ValueError(str(err)) from None
        return resolved.model_dump(mode="json")


@register("smoothgrad")
class SmoothGrad(Explainer):
    """``M̂_c(x) = 1/n Σ_k M_c(x + N(0, σ²))`` (thesis 003, section 4.2.1; Smilkov et al. 2017).

    ``M_c`` is the wrapped explainer (the gradient by default). The noise standard deviation
    is ``σ = sigma · (max(x) - min(x))`` per image (Smilkov et al.'s "noise level").

    Noise order (fixed, so results do not depend on ``batch_size``): a local generator seeded
    with ``seed`` draws, for ``k = 0 .. n-1`` in turn, one standard normal tensor of the whole
    batch's shape ``(B, C, H, W)``; copy ``k`` of image ``b`` is ``x_b + σ_b · noise_k[b]``.
    Copies are stacked ``m = max(1, batch_size // B)`` draws at a time, so each pass holds
    ``m · B`` noisy images.
    """

    Params = SmoothGradParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        p = self.params
        self.inner = get_explainer(p.base)(p.base_params)

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Average the wrapped explainer's relevance over the noisy copies, in batched passes."""
        p = self.params
        targets = self.predicted_targets(model, images, targets)
        batch = images.shape[0]
        flat = images.flatten(1)
        std = p.sigma * (flat.amax(dim=1) - flat.amin(dim=1))
        std = std.view(-1, *([1] * (images.dim() - 1)))
        generator = torch.Generator(device=images.device).manual_seed(p.seed)
        copies_per_pass = max(1, p.batch_size // batch)
        total = torch.zeros_like(images)
        for start in range(0, p.n, copies_per_pass):
            m = min(copies_per_pass, p.n - start)
            noise = torch.stack(
                [
                    torch.randn(
                        images.shape, generator=generator, device=images.device, dtype=images.dtype
                    )
                    for _ in range(m)
                ]
            )
            noisy = (images.unsqueeze(0) + std * noise).flatten(0, 1)
            part = self.inner.attribute(model, noisy, targets.repeat(m)).relevance
            total += part.view(m, *images.shape).sum(dim=0)
        extras = {"noise_std": std.flatten().tolist()}
        return Attribution(total / p.n, targets, extras)

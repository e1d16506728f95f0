"""Integrated Gradients: the path integral of the gradient from a baseline to the input."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, autograd, nn

from handlers.deadline import check_time
from handlers.explainers.base import (
    Attribution,
    Explainer,
    register,
    resolve_targets,
    select_logits,
)
from handlers.models.derived import inference_logits
from protocol.budget import images_per_pass
from protocol.params.explainers import IntegratedGradientsParams, Quadrature


@functools.lru_cache(maxsize=64)
def quadrature(steps: int, method: Quadrature) -> tuple[Tensor, Tensor]:
    """Nodes ``alpha`` in [0, 1] and weights (summing to 1) of the path integral (cached)."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)
    if method == "riemann_middle":
        alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
        return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if steps == 1:
        return torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
    weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
    weights[[0, -1]] /= 2
    return alphas, weights


@register("integrated_gradients")
class IntegratedGradients(Explainer):
    """``IG_i(x) = (x_i - x'_i) ∫_0^1 ∂F(x' + α(x - x'))/∂x_i dα`` [Sundararajan2017, eq. 1].

    ``F`` is the target logit and ``x'`` the constant image ``baseline``. The integral is a
    quadrature over ``steps`` nodes (Gauss-Legendre by default, as captum); the
    ``steps · B`` path points go through the model ``batch_size`` at a time, node-major.
    ``extras["completeness_gap"]`` is ``Σ_i IG_i - (F(x) - F(x'))`` per image (the
    completeness axiom, [Sundararajan2017, eq. 3]; small when ``steps`` suffices).
    """

    Params = IntegratedGradientsParams
    input_gradients_only = True

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Gradients at the path points, weighted and summed, times ``x - x'``.

        ``F(x)`` and ``F(x')`` (the predicted class and the completeness gap) come from one
        gradient-free pass of the fused inference copy
        (:func:`~handlers.models.derived.inference_logits`), not from the backward passes:
        riding along in the first path batch cost a forward and a backward pass for both
        images (52 instead of 50 images through the backward at 50 steps), which captum
        does not pay (benchmarks/results/explain.md).
        """
        p = self.params
        batch = images.shape[0]
        baseline = torch.full_like(images, p.baseline)
        end_logits = inference_logits(model, torch.cat([images, baseline])).clone()
        targets = resolve_targets(end_logits[:batch], targets)
        end_scores = select_logits(end_logits, targets.repeat(2))
        alphas, weights = (t.to(images) for t in quadrature(p.steps, p.method))
        delta = images - baseline
        per_pass = max(1, images_per_pass(p.batch_size, images.shape) // batch)
        total = torch.zeros_like(images)
        for start in range(0, p.steps, per_pass):
            check_time("Integrated Gradients")
            a = alphas[start : start + per_pass].view(-1, 1, 1, 1, 1)
            w = weights[start : start + per_pass].view(-1, 1, 1, 1, 1)
            points = (baseline + a * delta).flatten(0, 1).requires_grad_(True)
            objective = select_logits(model(points), targets.repeat(len(a))).sum()
            (grad,) = autograd.grad(objective, points)
            total += (w * grad.view(len(a), *images.shape)).sum(dim=0)
        relevance = delta * total
        gap = relevance.flatten(1).sum(1) - (end_scores[:batch] - end_scores[batch:])
        return Attribution(relevance, targets, {"completeness_gap": gap.tolist()})

"""Adversarial Perturbation Explanation Metric [doValle2019, ch. 3, §5.2].

For an image ``x``, the class ``y`` its relevance map ``R`` (values in [0, 1]) explains,
and the loss ``J``:

* directed relevance ``R_dir = R / ||R||_1 * sign(grad_x J(theta, x, y))`` (chapter 3);
* ``eps-``: the smallest ``eps`` on the grid for which ``x + eps * R_dir`` changes the
  prediction; ``eps+``: the same with the irrelevance map ``R- = 1 - R``;
* ``APEM = mean_i(eps+_i - eps-_i)`` over a set of images;
* ``APEM_norm = mean_i(eps+_i / eps-shuffle+_i - eps-_i / eps-shuffle-_i)`` (section 5.2),
  where ``eps-shuffle-`` (``+``) is the first ``eps`` at which any of ``shuffles`` randomly
  permuted copies of ``R`` (of their irrelevance maps ``1 - shuffled R``) flips the model.

Units and grid: ``eps_k = k * step`` for ``k = 1..max_steps`` (the thesis uses integer
steps: ``step = 1``). Since ``||R_dir||_1 = 1`` (where the gradient sign is non-zero),
``eps`` is the L1 norm of ``x' - x`` in [0, 1] pixel units, summed over the three channels
(a one-channel map is broadcast to the three channels before the L1 normalisation).
A size not reached on the grid is reported as ``None`` and enters the means as the cap
``(max_steps + 1) * step`` (a lower bound): a map whose relevance never flips the model
within the grid scores ``eps+ - cap <= 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from handlers.attacks.base import check_images, device_of, evaluation_mode
from handlers.metrics.flip_search import (
    NOT_FOUND,
    SEARCHES,
    CertifiedScan,
    FlipProblem,
    FlipSearch,
    SearchStats,
    full_precision,
)
from protocol.params.metrics import ApemParams, Grid
from protocol.ranking import spearman_with_loss
from protocol.validation import InvalidParameter, parse_params


@dataclass(frozen=True)
class ApemOutcome:
    """APEM of a set of ``B`` images (``None`` marks a size not found on the grid).

    Attributes:
        eps_minus, eps_plus: per image.
        apem_per_image: ``eps+ - eps-`` per image (caps substituted).
        apem: the mean of ``apem_per_image`` (thesis chapter 3).
        apem_norm, apem_norm_per_image, eps_shuffle_minus, eps_shuffle_plus: section 5.2,
            when ``normalise`` was asked for.
        predictions: clean predicted classes; targets: the explained classes.
        losses: per-image cross-entropy of the clean image against ``labels`` (section 5.4).
        spearman: Spearman correlation of the per-image APEM with the per-image loss
            (section 5.4) as ``{"rho", "p_value", "n"}``; ``None`` for < 3 images.
        approximate: whether an approximate search produced the sizes.
        params: the validated parameters; stats: forward passes and evaluations.
    """

    eps_minus: list[float | None]
    eps_plus: list[float | None]
    apem_per_image: list[float]
    apem: float
    predictions: list[int]
    targets: list[int]
    params: ApemParams
    stats: SearchStats
    approximate: bool
    losses: list[float]
    apem_norm: float | None = None
    apem_norm_per_image: list[float] | None = None
    eps_shuffle_minus: list[float | None] | None = None
    eps_shuffle_plus: list[float | None] | None = None
    spearman: dict[str, Any] | None = None

    def score(self, i: int = 0) -> dict[str, Any]:
        """Image ``i`` in the contract's ``ApemScore`` shape."""
        return {
            "eps_minus": self.eps_minus[i],
            "eps_plus": self.eps_plus[i],
            "apem": self.apem_per_image[i],
            "apem_norm": None if self.apem_norm_per_image is None else self.apem_norm_per_image[i],
            "grid": self.params.grid_description(),
            "approximate": self.approximate,
            "params": self.params.model_dump(),
        }


# --------------------------------------------------------------------------- maps
def check_relevance(relevance: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Relevance maps as ``(B, C, H, W)`` with ``C`` 1 or 3 and values in [0, 1].

    Accepts ``(B, H, W)``, ``(B, 1, H, W)`` or ``(B, 3, H, W)``; the thesis's ``R`` lies in
    [0, 1] (chapter 3), e.g. stage 2 of the visualization pipeline.
    """
    r = torch.as_tensor(relevance).detach()
    r = r.clone() if r.is_inference() else r
    if r.dim() == 3:
        r = r.unsqueeze(1)
    b, _, h, w = images.shape
    if r.dim() != 4 or r.shape[0] != b or r.shape[1] not in (1, 3) or tuple(r.shape[2:]) != (h, w):
        raise InvalidParameter("relevance", f"expected ({b}, 1 or 3, {h}, {w}), got {tuple(r.shape)}")
    if r.numel() and (not torch.isfinite(r).all() or r.min() < 0 or r.max() > 1):
        raise InvalidParameter("relevance", "values must lie in [0, 1] ([doValle2019, ch. 3])")
    return r.to(device=images.device, dtype=images.dtype)


def loss_gradient_sign(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sign(grad_x J(theta, x, y))`` with ``J`` the cross-entropy [doValle2019, ch. 3].

    Input gradients only (``torch.autograd.grad``); the model's parameters are untouched.
    """
    leaf = images.detach().clone().requires_grad_(True)
    with torch.enable_grad(), full_precision():
        loss = F.cross_entropy(model(leaf), targets, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad.sign()


def directed(maps: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``R_dir = R / ||R||_1 * sign`` [doValle2019, ch. 3], ``R`` broadcast to ``sign``'s shape.

    ``maps`` is ``(..., C, H, W)``, ``sign`` ``(..., 3, H, W)``; an all-zero map gives a zero
    direction (it never flips the model).
    """
    full = maps.expand(torch.broadcast_shapes(maps.shape, sign.shape))
    norm = full.abs().flatten(-3).sum(-1)[..., None, None, None]
    return torch.where(norm > 0, full / norm.clamp(min=torch.finfo(full.dtype).tiny), 0.0) * sign


def shuffled(maps: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` random permutations of each map's values [doValle2019, §5.2].

    ``maps`` ``(B, C, H, W)`` -> ``(B, count, C, H, W)``; the permutation is drawn over all
    ``C * H * W`` values on the CPU from ``seed``, so results do not depend on the device.
    """
    generator = torch.Generator().manual_seed(seed)
    b, size = maps.shape[0], maps[0].numel()
    order = torch.argsort(torch.rand((b, count, size), generator=generator), dim=-1).to(maps.device)
    flat = maps.flatten(1).unsqueeze(1).expand(b, count, size)
    return torch.gather(flat, 2, order).view(b, count, *maps.shape[1:])


# --------------------------------------------------------------------------- scoring
def _sizes(found: torch.Tensor, grid: Grid) -> list[float | None]:
    return [None if k == NOT_FOUND else k * grid.step for k in found.tolist()]


def _capped(sizes: list[float | None], grid: Grid) -> np.ndarray:
    return np.array([grid.cap if s is None else s for s in sizes], dtype=np.float64)


def _search(
    model: nn.Module,
    images: torch.Tensor,
    directions: torch.Tensor,
    reference: torch.Tensor,
    params: ApemParams,
    stats: SearchStats,
) -> torch.Tensor:
    """First flipping grid index of every unit ``directions[u]`` (``(U, G, 3, H, W)``)."""
    index = torch.arange(directions.shape[0], device=images.device) % images.shape[0]
    problem = FlipProblem(model, images, directions, index, reference[index], params.clip, params.batch_size)
    found = search_strategy(params).search(problem, params.grid)
    stats.add(problem.stats)
    return found


def search_strategy(params: ApemParams) -> FlipSearch:
    """The flip search ``params.search`` names ([doValle2019, §3.3], steps 3-7)."""
    if params.search == "exact":
        return CertifiedScan(params.first_chunk)
    return SEARCHES[params.search]()


def apem(
    model: nn.Module,
    images: torch.Tensor,
    relevance: torch.Tensor,
    targets: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    params: dict[str, Any] | ApemParams | None = None,
) -> ApemOutcome:
    """APEM [doValle2019, ch. 3] and optionally ``APEM_norm`` [doValle2019, §5.2] of a set.

    Args:
        model: pixel-space classifier.
        images: ``(B, 3, H, W)`` in [0, 1].
        relevance: ``(B, [1 or 3,] H, W)`` maps in [0, 1], one per image.
        targets: classes the maps explain (``y`` of the gradient sign); default: the
            clean predictions. A flip is any change of the clean prediction.
        labels: ground truth for the loss of the Spearman correlation (section 5.4);
            default: ``targets``.
        params: :class:`ApemParams` or a dict of them.

    Returns:
        :class:`ApemOutcome`.
    """
    p = parse_params(ApemParams, params)
    stats = SearchStats()
    with evaluation_mode(model):
        x = check_images(images).to(device_of(model))
        maps = check_relevance(relevance, x)
        with torch.no_grad():
            logits = model(x)
        predictions = logits.argmax(dim=1)
        y = predictions if targets is None else _classes(targets, "targets", logits)
        sign = loss_gradient_sign(model, x, y)
        units = torch.cat([directed(maps, sign), directed(1.0 - maps, sign)]).unsqueeze(1)
        found = _search(model, x, units, predictions, p, stats)
        shuffle_found = _shuffle_search(model, x, maps, sign, predictions, p, stats) if p.normalise else None
    b = x.shape[0]
    eps_minus, eps_plus = _sizes(found[:b], p.grid), _sizes(found[b:], p.grid)
    per_image = _capped(eps_plus, p.grid) - _capped(eps_minus, p.grid)
    loss_of = y if labels is None else _classes(labels, "labels", logits)
    losses = F.cross_entropy(logits, loss_of, reduction="none").cpu().double().numpy()
    outcome = ApemOutcome(
        eps_minus=eps_minus,
        eps_plus=eps_plus,
        apem_per_image=per_image.tolist(),
        apem=float(per_image.mean()),
        predictions=predictions.tolist(),
        targets=y.tolist(),
        params=p,
        stats=stats,
        approximate=SEARCHES[p.search].approximate,
        losses=losses.tolist(),
        spearman=spearman_with_loss(per_image, losses),
    )
    return outcome if shuffle_found is None else _with_norm(outcome, shuffle_found, p.grid)


def _shuffle_search(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    sign: torch.Tensor,
    predictions: torch.Tensor,
    p: ApemParams,
    stats: SearchStats,
) -> torch.Tensor:
    """First flip of any of the ``shuffles`` shuffled (ir)relevance maps (section 5.2)."""
    mixed = shuffled(maps, p.shuffles, p.seed)
    sign_g = sign.unsqueeze(1)
    units = torch.cat([directed(mixed, sign_g), directed(1.0 - mixed, sign_g)])
    return _search(model, x, units, predictions, p, stats)


def _with_norm(outcome: ApemOutcome, shuffle_found: torch.Tensor, grid: Grid) -> ApemOutcome:
    """Add ``APEM_norm = mean(eps+ / eps-shuffle+ - eps- / eps-shuffle-)`` (section 5.2)."""
    b = len(outcome.eps_minus)
    sh_minus, sh_plus = _sizes(shuffle_found[:b], grid), _sizes(shuffle_found[b:], grid)
    norm = _capped(outcome.eps_plus, grid) / _capped(sh_plus, grid) - _capped(
        outcome.eps_minus, grid
    ) / _capped(sh_minus, grid)
    return replace(
        outcome,
        apem_norm=float(norm.mean()),
        apem_norm_per_image=norm.tolist(),
        eps_shuffle_minus=sh_minus,
        eps_shuffle_plus=sh_plus,
    )


def _classes(values: torch.Tensor, name: str, logits: torch.Tensor) -> torch.Tensor:
    classes = torch.as_tensor(values, dtype=torch.long).to(logits.device).reshape(-1)
    if classes.numel() != logits.shape[0]:
        raise InvalidParameter(name, f"expected {logits.shape[0]} class indices, got {classes.numel()}")
    if classes.min() < 0 or classes.max() >= logits.shape[1]:
        raise InvalidParameter(name, f"class indices must lie in [0, {logits.shape[1] - 1}]")
    return classes

"""Certified lower bounds of a classifier's logit margins along a segment of inputs.

The exact flip search (:mod:`handlers.metrics.flip_search`) must find the *first* grid
point ``eps_k = k * step`` at which ``x + eps_k d`` changes the prediction, without assuming
that flips are monotone in ``eps`` ([doValle2019, §3.3], steps 3-7). Evaluating every
grid point below the flip is what made the exact search cost as many evaluations as the
thesis's scan. Here a whole run of grid points is cleared at once by proving that no point
of the segment ``{x + (e0 + t) d : 0 <= t <= T}`` can change the prediction.

The proof propagates an enclosure of every activation through the network:
``z(t) in c + s t +- r`` elementwise, with a centre ``c``, a slope ``s`` (the segment's one
direction, carried exactly through every linear layer) and a radius ``r >= 0`` (what the
non-linear layers cannot carry). Linear layers map ``(c, s)`` by ``W`` and ``r`` by
``|W|``; a ReLU that is active or inactive on the whole segment is exact; one that changes
sign is replaced by the parallel-bounds relaxation of DeepZ ([Singh2018, §3]): with ``l < 0 < u`` the
bounds of its input, ``relu(z) in lambda z + mu +- mu``, ``lambda = u / (u - l)``,
``mu = -lambda l / 2``. Max-pooling is exact in a window whose best unit stays on top
and a constant interval elsewhere. The margin of the reference class over class ``j`` is
bounded through the difference of their rows of the last linear layer, so its radius is
``|w_ref - w_j| . r`` and not the looser sum.

Along an APEM path only a few of the tens of thousands of ReLUs change sign between two
grid points, so the enclosures stay tight and long runs are proven up to a few points
before the flip (measured on the demo models: benchmarks/results/adversarial.md). The
radius grows by about the ratio of ``|W|`` to ``W`` in every layer,
so on deep networks only short segments are proven (the search then stops trying).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from handlers.models.derived import inference_layout

CERTIFY_TOLERANCE = 1e-3
"""A margin counts as certified positive above ``CERTIFY_TOLERANCE * (1 + max |logit|)``.

Far above the float32 rounding of a forward pass (about 1e-6 relative), so that a point
proven here never flips in the evaluation the sequential scan makes either.
"""


class UnsupportedNetwork(TypeError):
    """The network holds a layer these bounds cannot propagate (the search falls back)."""


class Enclosure(NamedTuple):
    """``z(t) in centre + slope * (t - half) +- radius`` for ``0 <= t <= 2 half`` (per row):
    ``centre`` is the value at the middle of the segment.

    Centres and slopes are stacked in one tensor, ``affine`` (``2P`` rows: the centres, then
    the slopes), so that a linear layer maps both in one call without concatenating them.
    """

    affine: Tensor
    radius: Tensor
    half: Tensor  # (P, 1, ...) half the segment's length, broadcastable to the others

    @property
    def centre(self) -> Tensor:
        return self.affine[: self.radius.shape[0]]

    @property
    def slope(self) -> Tensor:
        return self.affine[self.radius.shape[0] :]

    def pairs(self) -> Tensor:
        """``affine`` as ``(2, P, ...)``: broadcasts a per-row factor over centre and slope."""
        return self.affine.unflatten(0, (2, -1))

    def width(self) -> Tensor:
        """Elementwise half-width of the interval the values take over the whole segment."""
        return torch.addcmul(self.radius, self.slope.abs(), self.half)


Step = Callable[[Enclosure], Enclosure]


def _shaped(half: Tensor, like: Tensor) -> Tensor:
    return half.view(-1, *([1] * (like.dim() - 1)))


def _linear_step(layer: nn.Conv2d | nn.Linear) -> Step:
    """``W`` on centre and slope (one call on both), ``|W|`` on the radius."""
    weight, bias, magnitude = layer.weight, layer.bias, layer.weight.abs()
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise UnsupportedNetwork(f"padding mode {layer.padding_mode!r}")

        def apply(z: Tensor, w: Tensor) -> Tensor:
            return F.conv2d(inference_layout(z), w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:

        def apply(z: Tensor, w: Tensor) -> Tensor:
            return F.linear(z, w)

    def step(e: Enclosure) -> Enclosure:
        affine = apply(e.affine, weight)
        radius = apply(e.radius, magnitude)
        if bias is not None:
            affine[: radius.shape[0]] += bias.view(1, -1, 1, 1) if affine.dim() == 4 else bias
        return Enclosure(affine, radius, _shaped(e.half, radius))

    return step


def _relu(e: Enclosure) -> Enclosure:
    """DeepZ's parallel bounds: exact where the sign is fixed on the segment.

    With ``c`` the centre and ``w`` the half-width, the gain ``lambda = u / (u - l) =
    (c + w) / 2w`` clamped to [0, 1] is 1 for an active and 0 for an inactive unit, and the
    shift ``mu = -lambda l / 2 = lambda relu(w - c) / 2`` is 0 for both.
    """
    centre, width = e.centre, e.width()
    gain = ((centre + width) / (2 * width).clamp(min=1e-30)).clamp_(0.0, 1.0)
    shift = (width - centre).clamp_(min=0.0).mul_(gain).mul_(0.5)
    affine = e.pairs() * gain
    affine[0] += shift
    return Enclosure(affine.flatten(0, 1), torch.addcmul(shift, gain, e.radius), e.half)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _max_pool_step(pool: nn.MaxPool2d) -> Step:
    """Max-pooling: exact in a window whose best unit stays on top over the whole segment.

    In a window where the unit with the highest lower bound also lies above every other
    unit's upper bound, the maximum *is* that unit: its centre, slope and radius pass. Any
    other window keeps a constant interval from the pooled lower to the pooled upper
    bounds. The exact case needs windows that tile the map (kernel = stride, no padding,
    floor mode, as in VGG); overlapping windows (the ResNet stem) always take the interval.
    """
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    tiles = kernel == stride and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode

    area = kernel[0] * kernel[1]

    def window_sum(z: Tensor) -> Tensor:
        return F.avg_pool2d(z, kernel, stride) * area

    def step(e: Enclosure) -> Enclosure:
        width = e.width()
        low, high = e.centre - width, e.centre + width
        pooled_low, pooled_high = pool(low), pool(high)
        centre, radius = (pooled_low + pooled_high) / 2, (pooled_high - pooled_low) / 2
        if not tiles:
            return Enclosure(torch.cat([centre, torch.zeros_like(centre)]), radius, _shaped(e.half, centre))
        best_low = F.interpolate(pooled_low, scale_factor=kernel, mode="nearest")
        rows, cols = best_low.shape[-2:]
        low, high = low[..., :rows, :cols], high[..., :rows, :cols]
        chosen = (low == best_low).to(low.dtype)
        # exact where one unit reaches the best lower bound and no other unit's upper bound
        # does: that unit stays on top over the whole segment
        exact = (window_sum((high >= best_low).to(low.dtype)) == 1) & (window_sum(chosen) == 1)

        def pick(z: Tensor, otherwise: Tensor) -> Tensor:
            return torch.where(exact, window_sum(z[..., :rows, :cols] * chosen), otherwise)

        affine = torch.cat([pick(e.centre, centre), pick(e.slope, torch.zeros_like(centre))])
        return Enclosure(affine, pick(e.radius, radius), _shaped(e.half, centre))

    return step


def _monotone_linear_step(module: nn.Module) -> Step:
    """Average pooling and flattening: linear with non-negative weights, applied to all three."""

    def step(e: Enclosure) -> Enclosure:
        radius = module(e.radius)
        return Enclosure(module(e.affine), radius, _shaped(e.half, radius))

    return step


def _batch_norm_step(bn: nn.BatchNorm2d) -> Step:
    """An eval-mode batch norm that was not folded: a per-channel affine map."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedNetwork("batch norm without running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    scale, shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)

    def step(e: Enclosure) -> Enclosure:
        affine = e.pairs() * scale
        affine[0] += shift
        return Enclosure(affine.flatten(0, 1), e.radius * scale.abs(), e.half)

    return step


def _chain(steps: list[Step]) -> Step:
    def step(e: Enclosure) -> Enclosure:
        for s in steps:
            e = s(e)
        return e

    return step


def _residual_step(main: list[nn.Module], shortcut: nn.Module | None) -> Step:
    """torchvision's residual blocks: ``relu(main(x) + shortcut(x))``."""
    through_main = _chain([_step(m) for m in main])
    through_shortcut = _step(shortcut) if shortcut is not None else (lambda e: e)

    def step(e: Enclosure) -> Enclosure:
        a, b = through_main(e), through_shortcut(e)
        return _relu(Enclosure(a.affine + b.affine, a.radius + b.radius, a.half))

    return step


def _step(module: nn.Module) -> Step:
    """The propagation of one module (raises :class:`UnsupportedNetwork` for unknown ones)."""
    if isinstance(module, nn.Sequential):
        return _chain([_step(m) for m in module])
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return _linear_step(module)
    if isinstance(module, nn.ReLU):
        return _relu
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return lambda e: e
    if isinstance(module, nn.MaxPool2d):
        return _max_pool_step(module)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten)):
        return _monotone_linear_step(module)
    if isinstance(module, nn.BatchNorm2d):
        return _batch_norm_step(module)
    if isinstance(module, BasicBlock):
        return _residual_step([module.conv1, module.bn1, nn.ReLU(), module.conv2, module.bn2], module.downsample)
    if isinstance(module, Bottleneck):
        main = [module.conv1, module.bn1, nn.ReLU(), module.conv2, module.bn2, nn.ReLU(), module.conv3, module.bn3]
        return _residual_step(main, module.downsample)
    raise UnsupportedNetwork(f"no margin bounds through {type(module).__name__}")


class LineBounds:
    """Margin bounds of one network (``features`` then ``head``, the last layer linear).

    Args:
        network: a :class:`~handlers.models.architectures.SplitNetwork` (the fused inference
            copy: batch norm folded, fewer layers to propagate).

    Raises:
        UnsupportedNetwork: a layer has no propagation rule, or the last layer is not linear.
    """

    def __init__(self, network: nn.Module) -> None:
        layers = [*_children(network, "features"), *_children(network, "head")]
        if not layers or not isinstance(layers[-1], nn.Linear):
            raise UnsupportedNetwork("the network does not end with a linear layer")
        self.body = _chain([_step(m) for m in layers[:-1]])
        self.last = layers[-1]

    @torch.no_grad()
    def lowest_margins(self, middles: Tensor, directions: Tensor, halves: Tensor, reference: Tensor) -> Tensor:
        """A lower bound of the margin of ``reference[p]`` over every other class on the whole
        segment ``middles[p] + t directions[p]``, ``-halves[p] <= t <= halves[p]``, less
        the float tolerance: positive proves that no input of the segment changes the
        prediction (up to :data:`CERTIFY_TOLERANCE`), negative proves nothing.

        Args:
            middles, directions: ``(P, C, H, W)`` the segment of network inputs per row (after
                the pixel normalisation, which is affine: a pixel segment stays a segment).
            halves: ``(P,)`` half the extent of ``t`` per row.
            reference: ``(P,)`` the class that must stay on top.

        Returns:
            ``(P,)`` the bound less the tolerance, in logit units.
        """
        affine = inference_layout(torch.cat([middles, directions]))
        e = self.body(Enclosure(affine, torch.zeros_like(affine[: middles.shape[0]]), _shaped(halves, middles)))
        logits, slope = F.linear(e.affine, self.last.weight).unflatten(0, (2, -1))
        if self.last.bias is not None:
            logits = logits + self.last.bias
        own = reference.unsqueeze(1)
        margin = logits.gather(1, own) - logits
        drift = (slope.gather(1, own) - slope).abs() * halves.view(-1, 1)
        lowest = margin - drift - self._spread(e.radius, reference)
        lowest.scatter_(1, own, float("inf"))
        lowest = lowest.amin(dim=1) - CERTIFY_TOLERANCE * (1.0 + logits.abs().amax(dim=1))
        return lowest.nan_to_num(nan=float("-inf"))  # bounds that overflowed prove nothing

    def _spread(self, radius: Tensor, reference: Tensor) -> Tensor:
        """``|w_ref - w_j| . r`` per row and class, one weight difference per reference class."""
        weight = self.last.weight
        spread = radius.new_empty(radius.shape[0], weight.shape[0])
        for c in reference.unique().tolist():
            rows = reference == c
            spread[rows] = radius[rows] @ (weight[c] - weight).abs().T
        return spread


def _children(network: nn.Module, name: str) -> list[nn.Module]:
    part = getattr(network, name, None)
    if part is None:
        raise UnsupportedNetwork(f"the network has no {name!r}")
    return list(part) if isinstance(part, nn.Sequential) else [part]


_BUILT: weakref.WeakKeyDictionary[nn.Module, LineBounds | UnsupportedNetwork] = weakref.WeakKeyDictionary()
_BUILT_LOCK = threading.Lock()


def line_bounds(network: nn.Module) -> LineBounds | None:
    """The cached :class:`LineBounds` of ``network``; ``None`` where it is unsupported."""
    with _BUILT_LOCK:
        built = _BUILT.get(network)
        if built is None:
            try:
                built = LineBounds(network)
            except UnsupportedNetwork as error:
                built = error
            _BUILT[network] = built
    return built if isinstance(built, LineBounds) else None

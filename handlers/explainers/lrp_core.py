"""LRP as a modified gradient: rules for linear layers, batch-norm merging, canonized copies.

Formulation (ours, checked against zennit in the tests). Write every relevance as
``R = a · g``: an activation times a *modified gradient* ``g`` flowing backwards. For the
output of a linear layer (conv or dense) ``z = W x + b`` the relevance is ``R_j = z_j g_j``
and a rule only has to turn ``g`` at the output into ``g`` at the input, so that
``R_i = x_i g_i`` [doValle2019, §4.2.2]. Every other module keeps its ordinary
gradient, which gives exactly the usual LRP treatment of the rest of the network:

* ReLU passes relevance through (``R(z) = R(relu(z))``, zero where ``z <= 0``);
* max pooling sends the relevance to the winning input;
* average pooling and the residual sum ``a + b`` redistribute in proportion to their
  inputs (the z-rule without bias, zennit's ``Norm``) - so the skip connection gets its own,
  conserving rule without any hook;
* the input normalisation ``(x - mean) / std`` is element-wise, so the relevance of a
  normalised value is the relevance of its pixel.

Only the linear layers need custom backward passes (:class:`Rule`); they see the gradient
arriving at their output and never recompute the forward pass, so the epsilon rule costs a
forward and a backward pass. Batch norm is merged into the preceding linear layer first, on
a deep copy of the network built once per model instance (:func:`canonized`, cached by
:mod:`handlers.models.derived`). The served
model itself is never modified.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from handlers.models.derived import LINEAR_TYPES, derived_copy, frozen_copy

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: nn.grad.conv1d_input, 2: nn.grad.conv2d_input, 3: nn.grad.conv3d_input}


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + epsilon · sign(z)``, the epsilon rule's denominator (``sign(±0) = ±1``).

    Where ``z`` is exactly zero the rules divide ``z``-proportional numerators by it, so the
    sign chosen there never changes a result; it only has to be non-zero.
    """
    return z.abs().add_(epsilon).copysign_(z)


def linear_map(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``layer``'s linear map with ``weight`` in place of its own, and no bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    conv = _CONV[weight.dim() - 2]
    return conv(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def linear_map_transpose(layer: nn.Module, shape: torch.Size, weight: Tensor, v: Tensor) -> Tensor:
    """The transpose of :func:`linear_map` applied to ``v`` (a vector-Jacobian product)."""
    if isinstance(layer, nn.Linear):
        return v @ weight
    conv_input = _CONV_INPUT[weight.dim() - 2]
    return conv_input(shape, weight, v, layer.stride, layer.padding, layer.dilation, layer.groups)


# --------------------------------------------------------------------------- rules
class Rule(ABC):
    """An LRP rule for a linear layer in modified-gradient form (one configurable core).

    Subclasses implement :meth:`input_gradient`; the core (:class:`_RuleFunction`) calls it
    in the backward pass. With ``book_absorbed`` it also books the relevance each layer
    absorbs (bias, stabiliser) into :attr:`absorbed`, per sample, so that
    ``sum(input relevance) + absorbed == explained logit`` (the conservation check). The
    booking is an independent audit of the backward pass, not part of the explanation: it
    costs a few tensor operations per layer (measured: benchmarks/results/explain.md).
    """

    def __init__(self, book_absorbed: bool = False) -> None:
        self.book_absorbed = book_absorbed
        self.absorbed: Tensor | None = None

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        """``layer(x)`` forwards, with this rule's modified gradient backwards."""
        return _RuleFunction.apply(x, layer, self)

    @abstractmethod
    def input_gradient(self, layer: nn.Module, x: Tensor, z: Tensor, grad: Tensor) -> Tensor:
        """Modified gradient ``g_in`` with ``x · g_in = R_in``, given ``R_out = z · grad``."""

    def book(self, x: Tensor, z: Tensor, grad: Tensor, grad_in: Tensor) -> None:
        """Add ``Σ R_out - Σ R_in`` of one layer to :attr:`absorbed`."""
        lost = (z * grad).flatten(1).sum(1) - (x * grad_in).flatten(1).sum(1)
        self.absorbed = lost if self.absorbed is None else self.absorbed + lost


class Epsilon(Rule):
    """``R_i = Σ_j z_ij / (z_j + ε sign(z_j)) R_j`` ([doValle2019, §4.2.2], ε-variant).

    ``ε = 0`` is the basic rule. In gradient form: ``g_in = Wᵀ (g · z / (z + ε sign z))``.
    """

    def __init__(self, epsilon: float, book_absorbed: bool = False) -> None:
        super().__init__(book_absorbed)
        self.epsilon = epsilon

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        """Without booking, no custom backward at all: ``g_in = Wᵀ (g · r)`` with the constant
        ratio ``r = z / (z + ε sign z) = |z| / (|z| + ε)``, so a hook that scales the gradient
        of ``z`` by ``r`` leaves the rest of the backward pass to autograd in C++.

        A hook gets the gradient of ``z`` as it was when the hook was registered, also when
        the caller then adds to ``z`` in place (the residual ``out += identity``; PyTorch's
        autograd notes, "tensor hooks and in-place modification"). One product per layer
        backwards instead of the stop-gradient form ``stop(z) + (z·r - stop(z·r))`` (three
        element-wise passes forwards, one backwards): the same relevance bit for bit, and
        faster (benchmarks/results/explain.md).
        """
        if self.book_absorbed:
            return super().apply(layer, x)
        z = layer(x)
        if z.requires_grad:
            ratio = z.detach().abs()
            ratio.div_(ratio + self.epsilon)
            z.register_hook(ratio.mul)
        return z

    def input_gradient(self, layer: nn.Module, x: Tensor, z: Tensor, grad: Tensor) -> Tensor:
        scaled = grad * z / stabilize(z, self.epsilon)
        return linear_map_transpose(layer, x.shape, layer.weight, scaled)


class AlphaBeta(Rule):
    """``R_i = Σ_j (α z⁺_ij / Σ_i' z⁺_i'j + β z⁻_ij / Σ_i' z⁻_i'j) R_j`` [doValle2019, §4.2.2].

    The thesis's convention: ``α + β = 1``, ``α > 0``, ``β <= 0`` (``α=2, β=-1`` is zennit's
    ``AlphaBeta(alpha=2, beta=1, zero_params="bias")``). ``z⁺_ij`` are the positive
    contributions ``x_i w_ij`` (``x⁺ w⁺`` and ``x⁻ w⁻``), ``z⁻_ij`` the negative ones; biases
    are not contributions. Denominators are stabilised by ``stabilizer · sign``.
    """

    def __init__(
        self, alpha: float, beta: float, stabilizer: float = 1e-6, book_absorbed: bool = False
    ) -> None:
        super().__init__(book_absorbed)
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer

    def input_gradient(self, layer: nn.Module, x: Tensor, z: Tensor, grad: Tensor) -> Tensor:
        relevance = z * grad
        w_pos, w_neg = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        signed = bool((x_neg != 0).any())
        z_pos, z_neg = linear_map(layer, x_pos, w_pos), linear_map(layer, x_pos, w_neg)
        if signed:
            z_pos = z_pos + linear_map(layer, x_neg, w_neg)
            z_neg = z_neg + linear_map(layer, x_neg, w_pos)
        c_pos = self.alpha * relevance / stabilize(z_pos, self.stabilizer)
        c_neg = self.beta * relevance / stabilize(z_neg, self.stabilizer)
        back = linear_map_transpose
        g_pos = back(layer, x.shape, w_pos, c_pos) + back(layer, x.shape, w_neg, c_neg)
        if not signed:
            return torch.where(x > 0, g_pos, 0.0)
        g_neg = back(layer, x.shape, w_neg, c_pos) + back(layer, x.shape, w_pos, c_neg)
        return torch.where(x > 0, g_pos, torch.where(x < 0, g_neg, 0.0))


class _RuleFunction(torch.autograd.Function):
    """Identity on ``layer(x)`` forwards; ``rule.input_gradient`` backwards (no recomputation)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: nn.Module, rule: Rule) -> Tensor:
        z = layer(x)
        ctx.layer, ctx.rule = layer, rule
        ctx.save_for_backward(x, z)
        return z.clone()  # callers may add to it in place (the residual ``out += identity``)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        x, z = ctx.saved_tensors
        grad_in = ctx.rule.input_gradient(ctx.layer, x, z, grad)
        if ctx.rule.book_absorbed:
            ctx.rule.book(x, z, grad, grad_in)
        return grad_in, None, None


_ACTIVE_RULE: ContextVar[Rule | None] = ContextVar("lrp_active_rule", default=None)


@contextlib.contextmanager
def active_rule(rule: Rule) -> Iterator[Rule]:
    """Apply ``rule`` to the linear layers of canonized copies within this context (per thread)."""
    token = _ACTIVE_RULE.set(rule)
    try:
        yield rule
    finally:
        _ACTIVE_RULE.reset(token)


class RuleLayer(nn.Module):
    """A linear layer of a canonized copy: plain forward, or the active rule's backward."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        rule = _ACTIVE_RULE.get()
        if rule is None:
            return self.layer(x)
        return rule.apply(self.layer, x)


# --------------------------------------------------------------------------- canonization
def _wrap_linear_layers(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, LINEAR_TYPES) and _supported(child):
            setattr(module, name, RuleLayer(child))
        else:
            _wrap_linear_layers(child)


def _supported(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def canonize(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` with batch norm merged and rule-aware linear layers."""
    duplicate = frozen_copy(network)
    _wrap_linear_layers(duplicate)
    return duplicate


def canonized(network: nn.Module, probe: Tensor) -> nn.Module:
    """The cached canonized copy of ``network`` (built, and checked on ``probe``, once).

    Raises:
        RuntimeError: The canonized copy does not compute the same function (an
            architecture whose batch norms are not where registration order says).
    """
    return derived_copy(network, "lrp", canonize, lambda: probe)

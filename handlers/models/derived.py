"""Copies of a served network derived for one purpose, built once and checked on first use.

Two purposes use them: LRP's canonized copy (batch norm merged, rule-aware layers;
:mod:`handlers.explainers.lrp_core`) and the fused inference copy that scores many images
without gradients (:func:`inference_logits`) and carries the input gradients of the attacks
and of the gradient explainers (:class:`FusedClassifier`). The served network itself is
never modified: every copy is a deep copy, cached per network and purpose, and rebuilt when
a weight or buffer of the network changes in place.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- batch norm merging
def _fold_batch_norm(layer: nn.Module, bn: _BatchNorm) -> None:
    """Merge eval-mode ``bn`` into the linear ``layer`` that feeds it (in float64)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    weight = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)


def _mergeable(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, LINEAR_TYPES) or not isinstance(bn, _BatchNorm):
        return False
    if bn.running_var is None or bn.running_mean is None:
        return False
    return layer.weight.shape[0] == bn.num_features


def merge_batch_norms(module: nn.Module) -> int:
    """Fold every batch norm that directly follows a linear layer among siblings; count them.

    "Directly follows" is judged by registration order (``Sequential`` order, and
    ``conv1, bn1, ...`` in torchvision blocks); :func:`derived_copy` verifies the result.
    """
    merged = 0
    children = list(module.named_children())
    for (_, layer), (bn_name, bn) in zip(children, children[1:], strict=False):
        if _mergeable(layer, bn):
            _fold_batch_norm(layer, bn)
            setattr(module, bn_name, nn.Identity())
            merged += 1
    for _, child in module.named_children():
        merged += merge_batch_norms(child)
    return merged


def frozen_copy(network: nn.Module) -> nn.Module:
    """A deep copy in eval mode with batch norm merged and no parameter requiring grad."""
    duplicate = copy.deepcopy(network).eval()
    for parameter in duplicate.parameters():
        parameter.requires_grad_(False)
    merge_batch_norms(duplicate)
    return duplicate


# --------------------------------------------------------------------------- the cache
class _Entry(NamedTuple):
    network: nn.Module
    tensors: list[Tensor]
    fingerprint: tuple[Any, ...]


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, _Entry]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _fingerprint(tensors: list[Tensor]) -> tuple[Any, ...]:
    """Storage and version of every tensor: changes when weights change in place."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _still_valid(entry: _Entry | None) -> bool:
    return entry is not None and _fingerprint(entry.tensors) == entry.fingerprint


def derived_copy(
    network: nn.Module, purpose: str, build: Callable[[nn.Module], nn.Module], probe: Callable[[], Tensor]
) -> nn.Module:
    """The cached ``build(network)`` for ``purpose`` (built, and checked on ``probe()``, once).

    ``probe`` makes the check's input only when a copy is built, not on every call.

    The copy is rebuilt when a weight or buffer of ``network`` changes in place (its
    version counter moves, e.g. ``load_state_dict`` or an optimizer step). Replacing a
    parameter object by another is not watched: build a new model instead.

    Raises:
        RuntimeError: The copy does not compute the same function on ``probe`` (an
            architecture whose batch norms are not where registration order says).
    """
    entry = _CACHE.get(network, {}).get(purpose)
    if _still_valid(entry):  # the common case: no lock, no walk over the modules
        return entry.network
    with _CACHE_LOCK:
        entry = _CACHE.get(network, {}).get(purpose)
        if _still_valid(entry):
            return entry.network
        tensors = [*network.parameters(), *network.buffers()]
        fingerprint = _fingerprint(tensors)
        with torch.inference_mode(False):  # ordinary tensors, so gradients may run through
            duplicate = build(network)
        with torch.no_grad():
            checked = probe()
            expected, got = network(checked), duplicate(checked)
        tolerance = 1e-3 * (1.0 + float(expected.abs().max()))
        if not torch.allclose(expected, got, rtol=0.0, atol=tolerance):
            raise RuntimeError(
                f"the {purpose} copy changed the network's output; unsupported layout"
            )
        _CACHE.setdefault(network, {})[purpose] = _Entry(duplicate, tensors, fingerprint)
        return duplicate


# --------------------------------------------------------------------------- fast scoring
def inference_layout(batch: Tensor) -> Tensor:
    """``batch`` in channels-last memory order, for a forward pass without gradients.

    On the CPU, convolutions on channels-last input take oneDNN's kernels instead of the
    im2col path, which is faster (benchmarks/results/inference.md); the logits agree with
    the default layout to about 1e-6. Input gradients through this layout
    (:class:`FusedClassifier`) agree with the served network's to float rounding.
    """
    return batch.contiguous(memory_format=torch.channels_last)


def _inference_network(network: nn.Module) -> nn.Module:
    """Batch norm folded, channels-last weights, and every ReLU in place.

    The served networks keep their ReLUs out of place for the explainers' hooks; a copy that
    nobody hooks need not (autograd allows it: no layer of the served architectures saves
    the output that a ReLU after it overwrites). In place, a ReLU allocates no new activation
    tensor, which saves time, most with glibc's default allocator settings, which fault
    more memory in again (:mod:`handlers.allocator`; measured:
    benchmarks/results/inference.md). Same logits, bit for bit.
    """
    duplicate = frozen_copy(network).to(memory_format=torch.channels_last)
    for module in duplicate.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    return duplicate


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """A PixelClassifier's ``(normalize, network)``; ``None`` for any other module."""
    normalize, network = getattr(model, "normalize", None), getattr(model, "network", None)
    if normalize is None or network is None:
        return None
    return normalize, network


def _inference_copy(network: nn.Module, probe: Callable[[], Tensor]) -> nn.Module:
    """The cached inference copy of ``network`` (checked on ``probe()``, one normalised image)."""
    return derived_copy(network, "inference", _inference_network, probe)


def inference_parts(model: nn.Module, probe: Tensor) -> tuple[nn.Module, nn.Module] | None:
    """A PixelClassifier's ``normalize`` and the cached inference copy of its network.

    ``probe`` (pixels) checks the copy when it is first built. ``None`` for other modules.
    """
    parts = _parts(model)
    if parts is None:
        return None
    normalize, network = parts
    return normalize, _inference_copy(network, lambda: inference_layout(normalize(probe[:1])))


class _ToInferenceLayout(torch.autograd.Function):
    """:func:`inference_layout` whose gradient comes back in the default layout, as callers
    of a pixel classifier expect (torchattacks' PGDL2 calls ``.view`` on it)."""

    @staticmethod
    def forward(ctx: Any, batch: Tensor) -> Tensor:  # noqa: ANN401
        return inference_layout(batch)

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> Tensor:  # noqa: ANN401
        return gradient.contiguous()


class FusedClassifier(nn.Module):
    """Pixels in, logits out through a classifier's fused inference copy, with autograd.

    The function of the served :class:`~handlers.models.classifier.PixelClassifier`
    (batch norm folded, so equal up to float rounding: logits about 1e-6 apart), at a lower
    cost per gradient. Input gradients of shapes-resnet on two CPU cores, ms per image at
    batch 1 / 8 / 64: 1.26 / 0.52 / 0.32 through the served network, 0.92 / 0.36 / 0.27
    through this; random-weight resnet18 at 224 x 224: 38.8 / 32.3 -> 32.7 / 23.3 at batch
    1 / 8. Gradient, SmoothGrad, Integrated Gradients and SIS's selection run through it
    (their results match captum's through the served network within the reference tests'
    tolerances); so do the attacks, whose result is a gradient's sign: sign and rounding
    make their iterates chaotic where a component is near zero, so they agree with the same
    method run through the served network on most images, not all, and match a reference
    implementation exactly when it is run through this module too.
    """

    def __init__(self, normalize: nn.Module, fused: nn.Module) -> None:
        super().__init__()
        # not ``normalize`` / ``network``: those names make a module a PixelClassifier to
        # :func:`inference_logits`, which would derive a copy of this copy
        self.pixel_normalize = normalize
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        return self.fused(_ToInferenceLayout.apply(self.pixel_normalize(x)))


def fused_classifier(model: nn.Module, probe: Tensor) -> nn.Module:
    """``model`` as a :class:`FusedClassifier` (``model`` itself if not a PixelClassifier).

    ``probe`` (pixels) checks the fused copy when it is first built.
    """
    parts = inference_parts(model, probe)
    return model if parts is None else FusedClassifier(*parts)


def input_normalizer(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What :func:`normalized_logits` expects applied to pixels: a PixelClassifier's own
    ``normalize``, nothing for any other module."""
    parts = _parts(model)
    return (lambda batch: batch) if parts is None else parts[0]


def normalized_logits(model: nn.Module, normalized: Tensor) -> Tensor:
    """:func:`inference_logits` of pixels ``x`` given as ``input_normalizer(model)(x)``.

    For callers that assemble many inputs from a few normalised parts (LIME mixes one image
    with its hidden version): normalising the parts once instead of every assembled image,
    and assembling them straight into channels-last order, gives the same values bit for bit
    and spares two passes over the batch.
    """
    with torch.inference_mode():
        parts = _parts(model)
        batch = inference_layout(normalized)  # no copy when already channels-last
        if parts is None:
            return model(batch)
        return _inference_copy(parts[1], lambda: batch[:1])(batch)


def inference_logits(model: nn.Module, batch: Tensor) -> Tensor:
    """Logits of a batch that is only scored: no autograd, batch norm merged, channels-last.

    For a :class:`~handlers.models.classifier.PixelClassifier` the network runs as its
    cached inference copy (batch norm folded into the convolutions, channels-last weights;
    the speed-up: benchmarks/results/inference.md). Other modules
    run as they are, on channels-last input. Logits agree with ``model(batch)`` to about
    1e-6 (float32); every caller that compares predictions uses this one function for all
    of them (e.g. the exact flip search and the sequential scan).
    """
    with torch.inference_mode():
        return normalized_logits(model, input_normalizer(model)(batch))


def inference_features(model: nn.Module, batch: Tensor) -> Tensor:
    """``model.feature_map(batch)`` through the fused inference copy, without autograd.

    For Grad-CAM and NAM, whose gradient only runs through the head (faster than the
    served network's feature extractor: benchmarks/results/inference.md). Runs under ``no_grad``, not inference mode, so the result may be
    made a leaf of a graph through the head. Values agree with ``model.feature_map`` to
    about 1e-6. Needs a :class:`~handlers.models.classifier.PixelClassifier`.
    """
    parts = _parts(model)
    if parts is None:
        raise TypeError("the model must be a PixelClassifier (normalize + network)")
    normalize, network = parts
    with torch.no_grad():
        normalized = inference_layout(normalize(batch))
        return _inference_copy(network, lambda: normalized[:1]).features(normalized)


def inference_embeddings(model: nn.Module, batch: Tensor) -> tuple[Tensor, Tensor]:
    """``(model.embed(batch), model(batch))`` from one pass of the fused inference copy.

    The embedding is the global average of the last feature map (as
    :meth:`~handlers.models.classifier.PixelClassifier.embed`); the logits are the head
    applied to the same map, so the feature extractor runs once for both.
    """
    features = inference_features(model, batch)
    with torch.no_grad():
        return features.mean(dim=(2, 3)), model.head(features)

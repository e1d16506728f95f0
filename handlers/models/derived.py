"""Copies of a served network derived for one purpose, built once and checked on first use.

Two purposes use them: LRP's canonized copy (batch norm merged, rule-aware layers;
:mod:`handlers.explainers.lrp_core`) and the fused inference copy that scores many images
without gradients (:func:`inference_logits`). The served network itself is never modified:
every copy is a deep copy, cached per network and purpose, and rebuilt when a weight or
buffer of the network changes in place.
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
    network: nn.Module, purpose: str, build: Callable[[nn.Module], nn.Module], probe: Tensor
) -> nn.Module:
    """The cached ``build(network)`` for ``purpose`` (built, and checked on ``probe``, once).

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
        duplicate = build(network)
        with torch.no_grad():
            expected, got = network(probe), duplicate(probe)
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
    im2col path: measured on two cores, shapes-resnet at batch 128 runs 0.37 -> 0.20 ms per
    image and resnet18 at batch 16 25.5 -> 21.3 ms per image; the logits agree with the
    default layout to about 1e-6. Gradients keep the default layout, whose results the
    references (captum, zennit) match.
    """
    return batch.contiguous(memory_format=torch.channels_last)


def _inference_network(network: nn.Module) -> nn.Module:
    return frozen_copy(network).to(memory_format=torch.channels_last)


def _fused(model: nn.Module, batch: Tensor) -> tuple[nn.Module, Tensor] | None:
    """The cached inference copy of a PixelClassifier's network and its normalised input."""
    normalize, network = getattr(model, "normalize", None), getattr(model, "network", None)
    if normalize is None or network is None:
        return None
    normalized = inference_layout(normalize(batch))
    return derived_copy(network, "inference", _inference_network, normalized[:1]), normalized


def inference_logits(model: nn.Module, batch: Tensor) -> Tensor:
    """Logits of a batch that is only scored: no autograd, batch norm merged, channels-last.

    For a :class:`~handlers.models.classifier.PixelClassifier` the network runs as its
    cached inference copy (batch norm folded into the convolutions, channels-last weights):
    shapes-resnet at batch 128 on two CPU cores 0.37 -> 0.16 ms per image. Other modules
    run as they are, on channels-last input. Logits agree with ``model(batch)`` to about
    1e-6 (float32); every caller that compares predictions uses this one function for all
    of them (e.g. the exact flip search and the sequential scan).
    """
    with torch.inference_mode():
        fused = _fused(model, batch)
        if fused is None:
            return model(inference_layout(batch))
        network, normalized = fused
        return network(normalized)


def inference_features(model: nn.Module, batch: Tensor) -> Tensor:
    """``model.feature_map(batch)`` through the fused inference copy, without autograd.

    For Grad-CAM and NAM, whose gradient only runs through the head: on two CPU cores the
    shapes-resnet feature map of one image takes 0.44 ms this way against 0.78 ms through
    the served network. Runs under ``no_grad``, not inference mode, so the result may be
    made a leaf of a graph through the head. Values agree with ``model.feature_map`` to
    about 1e-6. Needs a :class:`~handlers.models.classifier.PixelClassifier`.
    """
    with torch.no_grad():
        fused = _fused(model, batch)
        if fused is None:
            raise TypeError("the model must be a PixelClassifier (normalize + network)")
        network, normalized = fused
        return network.features(normalized)


def inference_embeddings(model: nn.Module, batch: Tensor) -> tuple[Tensor, Tensor]:
    """``(model.embed(batch), model(batch))`` from one pass of the fused inference copy.

    The embedding is the global average of the last feature map (as
    :meth:`~handlers.models.classifier.PixelClassifier.embed`); the logits are the head
    applied to the same map, so the feature extractor runs once for both.
    """
    features = inference_features(model, batch)
    with torch.no_grad():
        return features.mean(dim=(2, 3)), model.head(features)

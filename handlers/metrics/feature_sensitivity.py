"""Spurious-feature audit: how much a model's accuracy rests on the regions each neural
feature sees ([Singla2022, §3.2, §5], "Salient ImageNet").

For the images of one class the audit ranks the penultimate-layer features by their
importance for the class (section 3.2), takes each feature's neural activation map as a
soft mask (Appendix A.1), corrupts the masked region with Gaussian noise (section 5,
equation 1) and measures the accuracy that is left, one feature at a time (section 5.2),
and for a group of features at once through the union of their masks (equation 2; core
accuracy when the group is the spurious features, spurious accuracy when it is the core
ones, definition 2). Which features are spurious is the auditor's judgement (the paper
asks crowd workers, looking at the maps); the audit gives the maps and the drops it rests on.

Equation 1 as used here: ``x' = clip(x + sigma * z * m, 0, 1)`` with ``z ~ N(0, I)`` of the
image's shape and the mask ``m`` in [0, 1] broadcast over the channels; pixels are in
[0, 1], so the clip keeps ``x'`` an image (the paper's copy here lacks its numbers; noise
levels are parameters). The noise of an image is drawn from a generator seeded with that
image's own seed, and the same draw serves every mask and level: the result does not
depend on how images are batched, and the drops of two features differ by their masks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from handlers.deadline import check_time
from handlers.explainers.gradcam import split_model
from handlers.explainers.neural_features import activation_maps, neural_features
from handlers.models.derived import inference_features, inference_logits
from protocol.budget import images_per_pass
from protocol.validation import InvalidParameter

MAX_FEATURES = 64
MAX_SIGMAS = 8


@dataclass(frozen=True)
class NoiseSensitivity:
    """Predictions under noise, per mask, level and image."""

    clean: Tensor
    """``(N,)`` predictions of the clean images."""
    features: Tensor
    """``(F, S, N)`` predictions with feature ``f``'s region corrupted at level ``s``."""
    groups: Tensor
    """``(G, S, N)`` the same for the union mask of each group (equation 2)."""
    coverage: Tensor
    """``(F, N)`` mean of each feature's mask: the share of the image it corrupts."""


@dataclass(frozen=True)
class ClassFeatures:
    """Each image's neural features for its label [Singla2022, §3.2]."""

    importance: Tensor
    """``(N, C)`` importance of every feature for the image's label."""
    values: Tensor
    """``(N, C)`` the features' values (mean activations)."""
    predictions: Tensor
    """``(N,)`` the model's predictions."""


def _predicted(model: nn.Module, maps: Tensor) -> Tensor:
    """Predictions from feature maps already computed: the head only, not a second pass."""
    _, head = split_model(model)
    with torch.no_grad():
        return head(maps).argmax(dim=1).cpu()


def class_features(model: nn.Module, images: Tensor, labels: Tensor) -> ClassFeatures:
    """Importances for ``labels``; averaged over a class's images they rank its features."""
    found = neural_features(model, images, labels)
    return ClassFeatures(found.importance.cpu(), found.values.cpu(), _predicted(model, found.maps))


def gaussian_corruption(images: Tensor, masks: Tensor, sigma: float, noise: Tensor) -> Tensor:
    """[Singla2022, eq. 1]: ``clip(x + sigma * z * m, 0, 1)``.

    ``images`` and ``noise`` are ``(N, C, H, W)``, ``masks`` ``(N, H, W)`` in [0, 1].
    """
    return (images + sigma * noise * masks.unsqueeze(1)).clamp_(0.0, 1.0)


def image_noise(like: Tensor, seeds: list[int]) -> Tensor:
    """``z ~ N(0, I)`` per image of ``like``, image ``i`` drawn from its own ``seeds[i]``."""
    draws = [
        torch.randn(like.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=like.dtype)
        for seed in seeds
    ]
    return torch.stack(draws).to(like.device)


def _check_noise(images: Tensor, seeds: list[int], sigmas: list[float]) -> None:
    if len(seeds) != images.shape[0]:
        raise InvalidParameter("seeds", f"expected {images.shape[0]}, got {len(seeds)}")
    if not 1 <= len(sigmas) <= MAX_SIGMAS or any(not 0.0 < s <= 4.0 for s in sigmas):
        raise InvalidParameter("sigmas", f"1 to {MAX_SIGMAS} noise levels, each in (0, 4]")


def _check(features: list[int], groups: list[list[int]], num: int) -> None:
    if not features and not groups:
        raise InvalidParameter("features", "give at least one feature or group")
    if len(features) > MAX_FEATURES:
        raise InvalidParameter("features", f"at most {MAX_FEATURES}")
    for param, named in (("features", features), ("groups", [f for group in groups for f in group])):
        for feature in named:
            if not 0 <= feature < num:
                raise InvalidParameter(param, f"feature {feature} is out of range for {num} features")
    if any(not group for group in groups):
        raise InvalidParameter("groups", "a group names at least one feature")


def _predictions(model: nn.Module, images: Tensor, masks: Tensor, sigmas: list[float], noise: Tensor) -> Tensor:
    """``(M, S, N)`` predictions for ``masks`` ``(M, N, H, W)``, many corrupted images per pass."""
    m, n = masks.shape[0], images.shape[0]
    jobs = [(j, s) for j in range(m) for s in range(len(sigmas))]
    per_pass = max(1, images_per_pass(256, images.shape) // n)
    out = torch.empty(m, len(sigmas), n, dtype=torch.long)
    for start in range(0, len(jobs), per_pass):
        check_time("the noise sensitivity scan")
        chunk = jobs[start : start + per_pass]
        batch = torch.cat([gaussian_corruption(images, masks[j], sigmas[s], noise) for j, s in chunk])
        predicted = inference_logits(model, batch).argmax(dim=1).view(len(chunk), n).cpu()
        for (j, s), row in zip(chunk, predicted, strict=True):
            out[j, s] = row
    return out


def noise_sensitivity(
    model: nn.Module,
    images: Tensor,
    seeds: list[int],
    features: list[int],
    sigmas: list[float],
    groups: list[list[int]] | None = None,
) -> NoiseSensitivity:
    """Predictions with each feature's region, and each group's union region, corrupted.

    Args:
        model: pixel-space classifier with ``feature_map`` and ``head``, in eval mode.
        images: ``(N, 3, H, W)`` in [0, 1].
        seeds: one noise seed per image.
        features: penultimate-layer features whose maps are corrupted one at a time.
        sigmas: noise levels (standard deviations in pixel units).
        groups: feature lists whose maps are merged by an element-wise max (equation 2).
    """
    groups = groups or []
    _check_noise(images, seeds, sigmas)
    maps = inference_features(model, images)
    _check(features, groups, maps.shape[1])
    size = (images.shape[-2], images.shape[-1])
    wanted = sorted({*features, *(f for group in groups for f in group)})
    nams = dict(zip(wanted, activation_maps(maps[:, wanted], size).unbind(1), strict=True))
    empty = images.new_zeros(0, images.shape[0], *size)
    feature_masks = torch.stack([nams[f] for f in features]) if features else empty
    group_masks = torch.stack([torch.stack([nams[f] for f in g]).amax(dim=0) for g in groups]) if groups else empty
    noise = image_noise(images, seeds)
    return NoiseSensitivity(
        clean=_predicted(model, maps),
        features=_predictions(model, images, feature_masks, sigmas, noise),
        groups=_predictions(model, images, group_masks, sigmas, noise),
        coverage=feature_masks.mean(dim=(2, 3)).cpu(),
    )


def mask_sensitivity(
    model: nn.Module, images: Tensor, masks: Tensor, seeds: list[int], sigmas: list[float]
) -> tuple[Tensor, Tensor]:
    """Predictions with annotated regions corrupted: ``(S, N)``, and the clean ``(N,)``.

    Section 5 with masks given rather than derived (Salient ImageNet's released soft masks,
    or ground truth): noise on the spurious masks measures core accuracy, on the core masks
    spurious accuracy (definition 2). ``masks`` is ``(N, H, W)`` in [0, 1]; the noise is
    :func:`noise_sensitivity`'s for the same seeds.
    """
    _check_noise(images, seeds, sigmas)
    if masks.shape != (images.shape[0], *images.shape[-2:]):
        raise InvalidParameter("masks", f"expected one {tuple(images.shape[-2:])} mask per image, got {tuple(masks.shape)}")
    if masks.min() < 0 or masks.max() > 1:
        raise InvalidParameter("masks", "mask values must lie in [0, 1]")
    noise = image_noise(images, seeds)
    with torch.no_grad():
        clean = inference_logits(model, images).argmax(dim=1).cpu()
    return _predictions(model, images, masks.unsqueeze(0), sigmas, noise)[0], clean

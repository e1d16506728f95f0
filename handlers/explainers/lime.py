"""LIME: a sparse linear surrogate over SLIC superpixels, fitted on batched perturbations."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from skimage.segmentation import slic
from sklearn.linear_model import Lasso, Ridge, lars_path
from torch import Tensor, nn

from handlers import visualization
from handlers.deadline import check_time
from handlers.explainers.base import (
    Attribution,
    Explainer,
    Explanation,
    InvalidParameter,
    chunks,
    register,
)
from handlers.models.derived import input_normalizer, normalized_logits
from protocol.budget import images_per_pass
from protocol.params.explainers import LimeParams


def segment(image: Tensor, p: LimeParams) -> np.ndarray:
    """SLIC superpixels of a ``(C, H, W)`` image in [0, 1], labelled ``0 .. S-1``."""
    array = image.detach().permute(1, 2, 0).cpu().double().numpy()
    labels = slic(
        array,
        n_segments=p.n_segments,
        compactness=p.compactness,
        sigma=p.slic_sigma,
        start_label=0,
        channel_axis=-1,
    )
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


def hidden_image(image: Tensor, segments: Tensor, num: int, hide_color: str | float) -> Tensor:
    """What a superpixel shows when it is switched off: its mean colour or a constant."""
    if hide_color != "mean":
        return torch.full_like(image, float(hide_color))
    flat = segments.flatten()
    counts = torch.bincount(flat, minlength=num).clamp(min=1).to(image)
    sums = torch.zeros(image.shape[0], num, dtype=image.dtype, device=image.device)
    sums.index_add_(1, flat, image.flatten(1))
    return (sums / counts)[:, flat].view_as(image)


def kernel_weights(samples: np.ndarray, width: float) -> np.ndarray:
    """``π(z) = exp(-d(z)² / σ²)`` [Stock2018, eq. 5] with ``d`` the cosine distance to all-on.

    For a binary ``z'`` with ``k`` of ``S`` superpixels on, ``d = 1 - sqrt(k / S)``.
    """
    on = samples.sum(axis=1)
    distance = 1.0 - np.sqrt(on / samples.shape[1])
    return np.exp(-(distance**2) / width**2)


def select_features(
    samples: np.ndarray, scores: np.ndarray, weights: np.ndarray, k: int
) -> np.ndarray:
    """The K superpixels chosen by the weighted Lasso path [Stock2018, §2, eq. 7]."""
    if k >= samples.shape[1]:
        return np.arange(samples.shape[1])
    root = np.sqrt(weights)[:, None]
    centred_x = (samples - np.average(samples, axis=0, weights=weights)) * root
    centred_y = (scores - np.average(scores, weights=weights)) * root[:, 0]
    _, _, coefs = lars_path(centred_x, centred_y, method="lasso")
    chosen = np.flatnonzero(coefs[:, 0])
    for step in range(coefs.shape[1]):
        nonzero = np.flatnonzero(coefs[:, step])
        if len(nonzero) > k:
            break
        chosen = nonzero
    return chosen


@register("lime")
class Lime(Explainer):
    """LIME ([Stock2018, §2, eqs. 4-7]; [Ribeiro2016]) on SLIC superpixels.

    For each image: SLIC segmentation into ``S`` superpixels; ``n`` binary samples ``z'``
    (the first all on, the rest uniform) turned into images at once (off superpixels show
    ``hide_color``) and scored by the model ``batch_size`` at a time (the target's softmax
    probability by default); kernel ``π = exp(-d²/σ²)`` (eq. 5); K superpixels selected by
    the weighted Lasso path, then a weighted ridge (or lasso) fit on them (eqs. 6-7).

    Hidden superpixels are grey (0.5) by default, not their mean colour (the ``lime``
    package's default): a hidden sky superpixel filled with its mean colour is still sky
    blue, so the surrogate cannot see a reliance on background colour. On the demo models
    grey tells the model that reads the planted background from the one that does not, and
    the mean colour does not (the shares measured: benchmarks/results/explain.md).

    The relevance of a pixel is its superpixel's weight, spread equally over the channels.
    ``extras``: ``segments`` (B, H, W) int32, and per image ``weights`` (S values, zero
    outside the K selected), ``intercept``, ``score`` (weighted R²), ``num_superpixels``.
    """

    Params = LimeParams

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Segment, perturb, score and fit one image at a time."""
        targets = self.predicted_targets(model, images, targets)
        relevance = torch.zeros_like(images)
        extras: dict[str, Any] = {"segments": [], "weights": [], "intercept": [], "score": []}
        for b in range(images.shape[0]):
            segments = segment(images[b], self.params)
            fit = self._explain_one(model, images[b], int(targets[b]), segments)
            pixel_map = torch.as_tensor(fit["weights"], dtype=images.dtype)[segments]
            relevance[b] = (pixel_map / images.shape[1]).to(images.device)
            extras["segments"].append(segments.astype(np.int32))
            for key in ("weights", "intercept", "score"):
                extras[key].append(fit[key])
        extras["num_superpixels"] = [len(w) for w in extras["weights"]]
        extras["segments"] = np.stack(extras["segments"])
        return Attribution(relevance, targets, extras)

    @classmethod
    def pictures(cls, explanation: Explanation, image: Tensor, outputs: set[str]) -> dict[str, bytes]:
        """The image with attention (its K superpixels shown) and the explanation path
        (superpixels revealed by weight) [Stock2018, §2, fig. 12]."""
        segments, weights = explanation.extras["segments"][0], explanation.extras["weights"][0]
        k = int(explanation.params["num_features"])
        drawn = {"attention_png": visualization.attention_png, "path_png": visualization.path_png}
        return {name: draw(image, segments, weights, k) for name, draw in drawn.items() if name in outputs}

    def _explain_one(
        self, model: nn.Module, image: Tensor, target: int, segments: np.ndarray
    ) -> dict[str, Any]:
        p = self.params
        num = int(segments.max()) + 1
        if p.num_features > num:
            raise InvalidParameter(
                "num_features", f"K={p.num_features} exceeds the {num} superpixels SLIC found"
            )
        generator = torch.Generator().manual_seed(p.seed)  # per image: batch == one by one
        samples = torch.randint(0, 2, (p.n, num), generator=generator, dtype=torch.uint8)
        samples[0] = 1
        scores = self._score(model, image, target, torch.as_tensor(segments), samples)
        return self._fit(samples.numpy().astype(np.float64), scores)

    def _score(
        self, model: nn.Module, image: Tensor, target: int, segments: Tensor, samples: Tensor
    ) -> np.ndarray:
        """Model scores of all perturbed images, built and scored ``batch_size`` at a time.

        Each perturbed image mixes two images pixel by pixel (shown or hidden), so both are
        normalised once and the mix is written straight in channels-last order (``H, W, C``
        in memory): the same values as normalising every perturbed image, without two extra
        passes over each batch (:func:`~handlers.models.derived.normalized_logits`).
        """
        segments = segments.to(image.device)
        fill = hidden_image(image, segments, samples.shape[1], self.params.hide_color)
        normalize = input_normalizer(model)
        with torch.inference_mode():
            shown, hidden = normalize(torch.stack([image, fill])).permute(0, 2, 3, 1).contiguous()
        samples = samples.to(image.device).bool()
        scores = []
        for part in chunks(len(samples), images_per_pass(self.params.batch_size, image.shape)):
            check_time("LIME")
            masks = samples[part][:, segments].unsqueeze(-1)  # (b, H, W, 1): pixel shown?
            batch = torch.where(masks, shown, hidden).permute(0, 3, 1, 2)
            logits = normalized_logits(model, batch)
            out = logits.softmax(dim=1) if self.params.output == "probability" else logits
            scores.append(out[:, target].double().cpu())
        return torch.cat(scores).numpy()

    def _fit(self, samples: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
        """Kernel weights, Lasso-path selection of K superpixels, weighted surrogate fit."""
        p = self.params
        weights = kernel_weights(samples, p.kernel_width)
        chosen = select_features(samples, scores, weights, p.num_features)
        model = Ridge(alpha=p.alpha) if p.surrogate == "ridge" else Lasso(alpha=p.alpha)
        model.fit(samples[:, chosen], scores, sample_weight=weights)
        coefficients = np.zeros(samples.shape[1])
        coefficients[chosen] = model.coef_
        score = model.score(samples[:, chosen], scores, sample_weight=weights)
        return {
            "weights": coefficients.tolist(),
            "intercept": float(model.intercept_),
            "score": float(score),
        }

"""The ``apem`` job: how reliable one explanation method is over a dataset.

Every image (of one class, or of all; a seeded sample of at most ``max_images``) is
explained for its predicted class and scored by APEM ([doValle2019, ch. 3]; APEM_norm,
[doValle2019, §5.2], when ``apem_params.normalise``) in TorchServe, ``IMAGES_PER_CALL`` images per
``apem_set`` call; the worker averages and correlates APEM with each image's loss against
its dataset label (Spearman, [doValle2019, §5.4, Tab. 5.3]). A call that runs out of the model
server's time (a fine grid on a large model) is split by :func:`~service.jobs.calls.in_batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from protocol.contract import ApemSetRequest, ApemSetResult
from protocol.ranking import spearman_with_loss
from service.jobs.calls import encoded_blob, in_batches
from service.torchserve_client import SyncTorchServeClient

IMAGES_PER_CALL = 8
"""Images per TorchServe call: the exact search shares forward passes between them (faster per
image than one at a time: benchmarks/results/service.md) while a call on a large model stays well within TorchServe's response timeout."""


def sample(images: list[dict[str, Any]], max_images: int, seed: int) -> list[dict[str, Any]]:
    """At most ``max_images`` of ``images``, drawn with ``seed``, in the dataset's order."""
    if len(images) <= max_images:
        return images
    chosen = np.random.default_rng(seed).choice(len(images), size=max_images, replace=False)
    return [images[i] for i in sorted(chosen.tolist())]


def score_images(
    client: SyncTorchServeClient,
    spec: dict[str, Any],
    images: list[dict[str, Any]],
    labels: list[int],
    read: Callable[[str], bytes],
    progress: Callable[[float], None],
    concurrency: int = 1,
) -> list[ApemSetResult]:
    """TorchServe's ``apem_set`` answers for ``images``, in order."""

    def fetch(batch: Sequence[tuple[dict[str, Any], int]]) -> ApemSetResult:
        request = ApemSetRequest(
            images=[encoded_blob(read, item["sha256"]) for item, _ in batch],
            labels=[label for _, label in batch],
            method=spec["method"],
            params=spec.get("params", {}),
            apem_params=spec.get("apem_params", {}),
        )
        return client.call(spec["model"], request, ApemSetResult)

    pairs = list(zip(images, labels, strict=True))
    return in_batches(pairs, IMAGES_PER_CALL, fetch, concurrency, lambda done: progress(0.99 * done))


def summarise(
    images: list[dict[str, Any]], labels: list[int], results: list[ApemSetResult]
) -> dict[str, Any]:
    """Per-image items, the means and the Spearman correlation with the loss."""
    first = results[0]
    scored = [(result, j) for result in results for j in range(len(result.apem))]  # request order
    items = [
        {
            "file": item["file"],
            "sha256": item["sha256"],
            "class_name": item["class_name"],
            "label": label,
            "prediction": result.targets[j],
            "eps_minus": result.eps_minus[j],
            "eps_plus": result.eps_plus[j],
            "apem": result.apem[j],
            "apem_norm": None if result.apem_norm is None else result.apem_norm[j],
            "loss": result.losses[j],
        }
        for item, label, (result, j) in zip(images, labels, scored, strict=True)
    ]
    apem_values = np.array([i["apem"] for i in items], dtype=np.float64)
    losses = np.array([i["loss"] for i in items], dtype=np.float64)
    norms_all = [i["apem_norm"] for i in items]
    return {
        "method_params": first.method_params,
        "params": first.params,
        "grid": first.grid,
        "approximate": first.approximate,
        "n_scored": len(items),
        "accuracy": float(np.mean([i["prediction"] == i["label"] for i in items])),
        "apem": float(apem_values.mean()),
        "apem_norm": None if None in norms_all else float(np.mean(norms_all)),
        "spearman": spearman_with_loss(apem_values, losses),
        "items": items,
    }

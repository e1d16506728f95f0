"""The ``audit`` job: which neural features a class rests on, and what its accuracy keeps
when their regions are corrupted ([Singla2022, §3.2, §5], "Salient ImageNet").

Per class (one, or every class of the dataset; a seeded sample of ``max_images`` each):

1. ``class_features`` calls (``IMAGES_PER_CALL`` images each) give every image's feature
   importances for its label; their mean over the class ranks the features (section 3.2,
   "feature rank") and the ``top_k`` are audited (the paper shows workers the top 5);
2. ``noise_sensitivity`` calls corrupt each audited feature's activation map, and the union
   map of each named group, with Gaussian noise at every level in ``sigmas`` (section 5,
   equations 1 and 2); the worker turns the predictions into accuracies and drops;
3. for each audited feature, its ``gallery_images`` most activating images are explained
   with ``nam`` for that feature (Appendix A.2: the map over the image, jet colormap), the
   panel the paper's workers judged core or spurious from.

Images uploaded with region masks (``_masks/core/...``, ``_masks/spurious/...``; Salient
ImageNet's masks, or ground truth) are also corrupted under their own masks: noise on the
spurious mask gives the annotated core accuracy, on the core mask the annotated spurious
accuracy (definition 2 with the annotations instead of feature maps).

Groups are the auditor's answer to that judgement: ``{"spurious": [...], "core": [...]}``
gives core accuracy (spurious regions corrupted) and spurious accuracy (core regions
corrupted), definition 2; any other name is reported as its own accuracy under noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from protocol.contract import (
    ClassFeaturesRequest,
    ClassFeaturesResult,
    ExplainRequest,
    ExplainResult,
    MaskSensitivityRequest,
    MaskSensitivityResult,
    NoiseSensitivityRequest,
    NoiseSensitivityResult,
)
from service.datasets import MASK_KINDS
from service.jobs.calls import encoded_blob, in_batches
from service.jobs.criticism import decode_array
from service.torchserve_client import SyncTorchServeClient

IMAGES_PER_CALL = 8
CORRUPTED_PER_CALL = 256
"""Most corrupted images one ``noise_sensitivity`` call may score (images x masks x levels):
fewer images per call when many features, groups or levels are asked for, so that a call on
a 224x224 model stays well inside TorchServe's response timeout (120 s by default) on CPU."""
MAX_OVERLAYS = 200
"""Most NAM overlays (classes x ``top_k`` x ``gallery_images``) one job may return: results
stay in Redis for the result TTL, and a 224x224 overlay is about 100 KB."""
Read = Callable[[str], bytes]


def noise_seed(seed: int, sha256: str) -> int:
    """An image's noise seed: from the job's seed and the image's content, so the same
    image gets the same noise whatever sample or batch it is in."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def rank_features(
    client: SyncTorchServeClient, model: str, images: list[dict[str, Any]], label: int, read: Read, concurrency: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(importance (N, C), values (N, C), predictions)`` of the class's images."""

    def fetch(batch: Sequence[dict[str, Any]]) -> ClassFeaturesResult:
        request = ClassFeaturesRequest(images=[encoded_blob(read, i["sha256"]) for i in batch], labels=[label] * len(batch))
        return client.call(model, request, ClassFeaturesResult)

    results = in_batches(images, IMAGES_PER_CALL, fetch, concurrency)
    importance = np.concatenate([decode_array(r.importance) for r in results])
    values = np.concatenate([decode_array(r.values) for r in results])
    return importance, values, [p for r in results for p in r.predictions]


def corrupt(
    client: SyncTorchServeClient,
    spec: dict[str, Any],
    images: list[dict[str, Any]],
    features: list[int],
    groups: list[list[int]],
    read: Read,
    concurrency: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features (F, S, N), groups (G, S, N), coverage (F, N))`` over the class's images."""
    per_image = (len(features) + len(groups)) * len(spec["sigmas"])
    per_call = max(1, min(IMAGES_PER_CALL, CORRUPTED_PER_CALL // max(1, per_image)))

    def fetch(batch: Sequence[dict[str, Any]]) -> NoiseSensitivityResult:
        request = NoiseSensitivityRequest(
            images=[encoded_blob(read, i["sha256"]) for i in batch],
            seeds=[noise_seed(int(spec["seed"]), i["sha256"]) for i in batch],
            features=features,
            groups=groups,
            sigmas=spec["sigmas"],
        )
        return client.call(spec["model"], request, NoiseSensitivityResult)

    results = in_batches(images, per_call, fetch, concurrency)
    s = len(spec["sigmas"])

    def joined(rows: list[list[Any]], shape: tuple[int, ...]) -> np.ndarray:
        """Each call's ``[..][image]`` answers as ``shape + (images,)``, joined on images."""
        return np.concatenate([np.asarray(r, dtype=np.float64).reshape(*shape, len(c.clean)) for r, c in zip(rows, results, strict=True)], axis=-1)

    by_feature = joined([r.features for r in results], (len(features), s)).astype(np.int64)
    by_group = joined([r.groups for r in results], (len(groups), s)).astype(np.int64)
    coverage = joined([r.coverage for r in results], (len(features),))
    return by_feature, by_group, coverage


def corrupt_annotated(
    client: SyncTorchServeClient, spec: dict[str, Any], images: list[dict[str, Any]], kind: str, label: int,
    read: Read, concurrency: int,
) -> dict[str, Any]:
    """Accuracy with each image's ``kind`` mask (uploaded under ``_masks/<kind>/``) corrupted."""
    sigmas = list(spec["sigmas"])
    per_call = max(1, min(IMAGES_PER_CALL, CORRUPTED_PER_CALL // len(sigmas)))

    def fetch(batch: Sequence[dict[str, Any]]) -> MaskSensitivityResult:
        request = MaskSensitivityRequest(
            images=[encoded_blob(read, i["sha256"]) for i in batch],
            masks=[encoded_blob(read, i["masks"][kind]) for i in batch],
            seeds=[noise_seed(int(spec["seed"]), i["sha256"]) for i in batch],
            sigmas=sigmas,
        )
        return client.call(spec["model"], request, MaskSensitivityResult)

    results = in_batches(images, per_call, fetch, concurrency)
    predictions = np.concatenate([np.asarray(r.predictions, dtype=np.int64).reshape(len(sigmas), -1) for r in results], axis=1)
    clean = float(np.mean([p == label for r in results for p in r.clean]))
    return {
        "kind": kind,
        "n_images": len(images),
        "accuracy": clean,
        "coverage": float(np.mean([c for r in results for c in r.coverage])),
        "noise": _accuracies(predictions, np.full(len(images), label), sigmas, clean),
    }


def _accuracies(predictions: np.ndarray, labels: np.ndarray, sigmas: list[float], clean: float) -> list[dict[str, float]]:
    """Per noise level of ``(S, N)`` predictions: accuracy and its drop from the clean one."""
    return [
        {"sigma": sigma, "accuracy": float(acc), "drop": clean - float(acc)}
        for sigma, acc in zip(sigmas, (predictions == labels).mean(axis=1), strict=True)
    ]


def feature_gallery(
    client: SyncTorchServeClient, model: str, images: list[dict[str, Any]], values: np.ndarray,
    feature: int, label: int, count: int, read: Read,
) -> list[dict[str, Any]]:
    """The ``count`` images that activate ``feature`` most, with its map over each."""
    order = np.argsort(-values[:, feature], kind="stable")[:count]
    shown = []
    for index in order.tolist():
        request = ExplainRequest(
            image=encoded_blob(read, images[index]["sha256"]), method="nam", params={"feature": feature}, target=label,
            colormap="jet", outputs=["overlay_png"],
        )
        result = client.call(model, request, ExplainResult)
        shown.append({
            "file": images[index]["file"], "sha256": images[index]["sha256"],
            "value": float(values[index, feature]), "overlay_png": result.overlay_png,
        })
    return shown


def audit_class(
    client: SyncTorchServeClient,
    spec: dict[str, Any],
    images: list[dict[str, Any]],
    label: int,
    read: Read,
    progress: Callable[[float], None],
    concurrency: int = 1,
) -> dict[str, Any]:
    """The audit of one class's images (see the module docstring)."""
    model, sigmas = spec["model"], list(spec["sigmas"])
    importance, values, predictions = rank_features(client, model, images, label, read, concurrency)
    progress(0.3)
    mean_importance = importance.mean(axis=0)
    top = np.argsort(-mean_importance, kind="stable")[: int(spec["top_k"])].tolist()
    named = spec.get("groups") or {}
    groups = [list(v) for v in named.values()]
    by_feature, by_group, coverage = corrupt(client, spec, images, top, groups, read, concurrency)
    progress(0.8)
    labels = np.full(len(images), label)
    clean = float(np.mean(np.asarray(predictions) == label))
    features = []
    for f, feature in enumerate(top):
        features.append({
            "feature": feature,
            "rank": f + 1,
            "importance": float(mean_importance[feature]),
            "value": float(values[:, feature].mean()),
            "coverage": float(coverage[f].mean()),
            "noise": _accuracies(by_feature[f], labels, sigmas, clean),
            "top_images": feature_gallery(
                client, model, images, values, feature, label, int(spec["gallery_images"]), read
            ),
        })
    group_results = [
        {"name": name, "features": list(members), "noise": _accuracies(by_group[g], labels, sigmas, clean)}
        for g, (name, members) in enumerate(named.items())
    ]
    accuracy_of = {g["name"]: g["noise"] for g in group_results}
    annotated = [
        corrupt_annotated(client, spec, marked, kind, label, read, concurrency)
        for kind in MASK_KINDS
        if (marked := [i for i in images if kind in i.get("masks", {})])
    ]
    annotated_of = {a["kind"]: a["noise"] for a in annotated}
    return {
        "n_images": len(images),
        "accuracy": clean,
        "features": features,
        "groups": group_results,
        "core_accuracy": accuracy_of.get("spurious"),
        "spurious_accuracy": accuracy_of.get("core"),
        "annotated": annotated,
        "annotated_core_accuracy": annotated_of.get("spurious"),
        "annotated_spurious_accuracy": annotated_of.get("core"),
    }

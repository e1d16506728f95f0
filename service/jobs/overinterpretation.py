"""The ``overinterpretation`` job: how few of its pixels a model needs to stay confident
([Carter2021], "Overinterpretation reveals image classification model pathologies").

Every image (of one class, or all; a seeded sample of at most ``max_images``) goes to
TorchServe's ``sufficient_subsets`` task, ``IMAGES_PER_CALL`` per call, with its region
masks when the upload had them (``_masks/core/...``, ``_masks/spurious/...``): the ``sis``
explainer's subset for the image's label, the label's probability with only
``keep_fraction`` of the pixels shown ([Carter2021, abstract]: 95 % masked), and the
subset's share on each region. The worker summarises per class and overall, and shows the
``gallery_images`` images with the smallest subsets, each subset alone on black.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from statistics import median
from typing import Any

import numpy as np

from protocol.contract import (
    ExplainRequest,
    ExplainResult,
    SufficientSubsetsRequest,
    SufficientSubsetsResult,
)
from protocol.params.metrics import SisParams
from service.datasets import MASK_KINDS
from service.jobs.calls import encoded_blob, in_batches
from service.torchserve_client import SyncTorchServeClient

IMAGES_PER_CALL = 8
IMAGE_PASSES_PER_CALL = IMAGES_PER_CALL * SisParams().passes_per_image
"""At most 8 images per ``sufficient_subsets`` call (one backward selection runs them as one
batch), fewer when a finer ``step_fraction`` asks for more passes per image than the
default's 51: a call's work stays that of 8 images at the default step (37 s for a
224x224 ResNet-50 on two CPU cores), inside TorchServe's response timeout (120 s by default)."""
Read = Callable[[str], bytes]


def score_subsets(
    client: SyncTorchServeClient,
    spec: dict[str, Any],
    images: list[dict[str, Any]],
    labels: list[int],
    read: Read,
    progress: Callable[[float], None],
    concurrency: int = 1,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The explainer's resolved parameters and one row per image, in ``images``' order.

    Images are sent in groups with the same region masks, so that every call carries one
    mask per image for each of its regions.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, item in enumerate(images):
        groups.setdefault(mask_kinds(item), []).append(index)
    rows: list[dict[str, Any]] = [{} for _ in images]
    params: dict[str, Any] = {}
    done = 0
    per_call = images_per_call(spec.get("params", {}))
    for kinds, indices in groups.items():

        def fetch(batch: Sequence[int], kinds: tuple[str, ...] = kinds) -> SufficientSubsetsResult:
            request = SufficientSubsetsRequest(
                images=[encoded_blob(read, images[i]["sha256"]) for i in batch],
                labels=[labels[i] for i in batch],
                params=spec.get("params", {}),
                regions={k: [encoded_blob(read, images[i]["masks"][k]) for i in batch] for k in kinds},
            )
            return client.call(spec["model"], request, SufficientSubsetsResult)

        def advance(share: float, before: int = done, size: int = len(indices)) -> None:
            progress(0.95 * (before + share * size) / len(images))

        results = in_batches(indices, per_call, fetch, concurrency, advance)
        answered = iter(indices)
        for result in results:  # a call split for lack of time answers for fewer images
            params = result.params
            for j in range(len(result.predictions)):
                i = next(answered)
                rows[i] = _row(images[i], labels[i], result, j)
        done += len(indices)
    return params, rows


def mask_kinds(item: dict[str, Any]) -> tuple[str, ...]:
    """The region masks an image was uploaded with: the group :func:`score_subsets` sends it in."""
    return tuple(kind for kind in MASK_KINDS if kind in item.get("masks", {}))


def in_call_order(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``images`` in the order :func:`score_subsets` sends them: grouped by their region
    masks, groups in the order of their first image."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for item in images:
        groups.setdefault(mask_kinds(item), []).append(item)
    return [item for group in groups.values() for item in group]


def images_per_call(params: dict[str, Any]) -> int:
    """Images per call for these explainer parameters (checked on the job's arrival)."""
    passes = SisParams.model_validate(params).passes_per_image
    return max(1, min(IMAGES_PER_CALL, IMAGE_PASSES_PER_CALL // passes))


def _row(item: dict[str, Any], label: int, result: SufficientSubsetsResult, j: int) -> dict[str, Any]:
    return {key: item[key] for key in ("file", "sha256", "class_name")} | {
        "label": label,
        "prediction": result.predictions[j],
        "sis_fraction": result.sis_fraction[j],
        "sis_confidence": result.sis_confidence[j],
        "kept_fraction": result.kept_fraction,
        "kept_confidence": result.kept_confidence[j],
        "kept_prediction": result.kept_prediction[j],
        "confident_when_kept": result.confident_when_kept[j],
        "region_share": {k: v[j] for k, v in result.region_share.items()},
        "region_coverage": {k: v[j] for k, v in result.region_coverage.items()},
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a set of rows shows: accuracy, the share confident with only the kept pixels,
    subset sizes, and per region the subsets' mean share on it against its mean coverage."""
    sizes = [r["sis_fraction"] for r in rows if r["sis_fraction"] is not None]
    regions = {}
    for kind in MASK_KINDS:
        marked = [r for r in rows if r["region_share"].get(kind) is not None]
        if marked:
            regions[kind] = {
                "n_images": len(marked),
                "subset_share": float(np.mean([r["region_share"][kind] for r in marked])),
                "coverage": float(np.mean([r["region_coverage"][kind] for r in marked])),
            }
    return {
        "n_images": len(rows),
        "accuracy": float(np.mean([r["prediction"] == r["label"] for r in rows])),
        "confident_when_kept": float(np.mean([r["confident_when_kept"] for r in rows])),
        "median_kept_confidence": float(median(r["kept_confidence"] for r in rows)),
        "with_subset": len(sizes) / len(rows),
        "median_subset": float(median(sizes)) if sizes else None,
        "regions": regions,
    }


def by_class(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`summarise` of each class's rows, classes in name order."""
    names = sorted({r["class_name"] for r in rows})
    return [{"class_name": name, **summarise([r for r in rows if r["class_name"] == name])} for name in names]


def subset_gallery(
    client: SyncTorchServeClient, spec: dict[str, Any], rows: list[dict[str, Any]], read: Read
) -> list[dict[str, Any]]:
    """The ``gallery_images`` images with the smallest subsets, each subset shown alone."""
    found = sorted((r for r in rows if r["sis_fraction"] is not None), key=lambda r: (r["sis_fraction"], r["file"]))
    shown = []
    for row in found[: int(spec["gallery_images"])]:
        request = ExplainRequest(
            image=encoded_blob(read, row["sha256"]), method="sis", params=spec.get("params", {}),
            target=row["label"], outputs=["attention_png"],
        )
        result = client.call(spec["model"], request, ExplainResult)
        shown.append({key: row[key] for key in ("file", "sha256", "class_name", "sis_fraction", "sis_confidence")}
                     | {"subset_png": result.attention_png})
    return shown

"""The ``evaluate`` job: top-1 and top-k error over a dataset, and the errors rectified by
human votes [Stock2018, §3.1, Tab. 1].

Stock & Cisse showed each image a model misclassified to five raters with the predicted class
and asked whether that class is relevant for the image; a prediction at least four of five
raters agree with counts as correct in the *rectified* error (``agreement`` 0.8 of the raters). Votes live in the dataset's
``metadata.csv`` (or ``metadata.json``, ``{"votes": [...]}`` with the same fields): one row
per image and class judged, ``file`` (the path in the archive), ``class_name`` (the class the
raters were shown), ``yes`` (how many said relevant) and optionally ``raters`` (default 5).
Votes are about an image and a class, not about a model, so they serve any model: an image
is rectified-correct at top-1 when its label or its predicted class has enough ``yes`` votes,
and at top-k when the label or any of its top-k classes has.

The job also lists the misclassified images with no votes yet for their predicted class,
with the top-k predictions: what to show raters next.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from protocol.contract import EmbedRequest, EmbedResult
from service.jobs.calls import encoded_blob, in_batches
from service.jobs.criticism import decode_array
from service.torchserve_client import SyncTorchServeClient

DEFAULT_RATERS = 5
Votes = dict[tuple[str, str], tuple[int, int]]


def read_votes(metadata: Any) -> Votes:
    """``(file, class_name) -> (yes, raters)`` from a dataset's metadata; ``ValueError`` naming
    the row when one is malformed. No metadata, or none with votes, gives no votes."""
    if isinstance(metadata, dict):
        rows = metadata.get("votes", [])
        if not isinstance(rows, list):
            raise ValueError("metadata.json: `votes` must be a list of objects")
    elif isinstance(metadata, list):
        rows = metadata if metadata and "yes" in metadata[0] else []
    else:
        rows = []
    votes: Votes = {}
    for number, row in enumerate(rows, start=1):
        try:
            file, class_name = str(row["file"]).strip(), str(row["class_name"]).strip()
            yes = int(row["yes"])
            raters = int(row.get("raters") or DEFAULT_RATERS)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"votes row {number}: needs file, class_name, yes (and optionally raters) as numbers") from None
        if not 0 <= yes <= raters or raters < 1:
            raise ValueError(f"votes row {number}: yes must be between 0 and raters ({yes} of {raters})")
        votes[(file, class_name)] = (yes, raters)
    return votes


def probabilities(
    client: SyncTorchServeClient,
    model: str,
    images: list[dict[str, Any]],
    read: Callable[[str], bytes],
    batch_size: int,
    progress: Callable[[float], None],
    concurrency: int = 1,
) -> np.ndarray:
    """``(N, classes)`` class probabilities of ``images``, ``batch_size`` per TorchServe call."""
    def fetch(batch: Sequence[dict[str, Any]]) -> EmbedResult:
        encoded = [encoded_blob(read, i["sha256"]) for i in batch]
        return client.call(model, EmbedRequest(images=encoded), EmbedResult)

    answers = in_batches(images, batch_size, fetch, concurrency, lambda done: progress(0.95 * done))
    parts = [decode_array(answer.probabilities) for answer in answers]
    return np.concatenate(parts)


def summarise(
    images: list[dict[str, Any]],
    probs: np.ndarray,
    model_labels: list[str],
    votes: Votes,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Errors, per-class accuracies, the most frequent confusions, rectified errors (when the
    dataset has votes) and the images to show raters next."""
    k = min(int(spec["top_k"]), len(model_labels))
    agreement = float(spec["agreement"])
    index_of = {name: index for index, name in enumerate(model_labels)}
    labels = np.array([index_of[i["class_name"]] for i in images])
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top1 = ranked[:, 0] == labels
    topk = (ranked == labels[:, None]).any(axis=1)

    def endorsed(item: dict[str, Any], cls: int) -> bool:
        yes, raters = votes.get((item["file"], model_labels[cls]), (0, DEFAULT_RATERS))
        return yes >= agreement * raters - 1e-9

    rectified1 = np.array([ok or endorsed(i, int(r[0])) for i, r, ok in zip(images, ranked, top1, strict=True)])
    rectifiedk = np.array([ok or any(endorsed(i, int(c)) for c in r) for i, r, ok in zip(images, ranked, topk, strict=True)])
    wrong = np.flatnonzero(~top1)
    unjudged = [j for j in wrong.tolist() if (images[j]["file"], model_labels[int(ranked[j, 0])]) not in votes]
    per_class = []
    for name in sorted({i["class_name"] for i in images}):
        rows = labels == index_of[name]
        per_class.append({
            "class_name": name, "label": index_of[name], "n": int(rows.sum()),
            "top1_accuracy": float(top1[rows].mean()), "topk_accuracy": float(topk[rows].mean()),
        })
    confusions = Counter((model_labels[labels[j]], model_labels[int(ranked[j, 0])]) for j in wrong.tolist())
    return {
        "n_images": len(images),
        "top_k": k,
        "top1_error": float(1 - top1.mean()),
        "topk_error": float(1 - topk.mean()),
        "per_class": per_class,
        "confusions": [{"class_name": t, "predicted": p, "count": c} for (t, p), c in confusions.most_common(20)],
        "rectified": None if not votes else {
            "agreement": agreement,
            "top1_error": float(1 - rectified1.mean()),
            "topk_error": float(1 - rectifiedk.mean()),
            "misclassified_with_votes": len(wrong) - len(unjudged),
        },
        "n_misclassified": len(wrong),
        "to_review": [
            {
                "file": images[j]["file"],
                "sha256": images[j]["sha256"],
                "class_name": images[j]["class_name"],
                "predictions": [{"class_name": model_labels[int(c)], "probability": float(probs[j, c])} for c in ranked[j]],
            }
            for j in unjudged[: int(spec["review_limit"])]
        ],
    }

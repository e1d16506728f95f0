"""Criticism scoring (TorchServe calls, in batches) and selection for the criticism job.

Scores per candidate image of the class:

* ``probs`` — the model's probability of the class (low = the model finds it atypical);
* ``adversarial`` — steps an iterative attack needs to flip the prediction (few = fragile);
* ``mmd`` — penultimate-layer embeddings, handed to the MMD-critic selection of
  ``handlers.criticism.selection`` (torch-free) when it is installed;
* ``random`` — a seeded random sample (the baseline), no model call.

Selection is deterministic: ties are broken by the candidate's position in the manifest
(sorted by class and file), and randomness is seeded by ``params["seed"]`` (default 0).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.contract import (
    DescribeResult,
    EmbedRequest,
    EmbedResult,
    EncodedArray,
    RobustnessRequest,
    RobustnessResult,
)
from service.torchserve_client import SyncTorchServeClient


@dataclass
class Scores:
    values: list[float | None]
    embeddings: np.ndarray | None = None


def decode_array(encoded: EncodedArray) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(encoded.data)), allow_pickle=False)


def _class_index(described: DescribeResult, spec: dict[str, Any]) -> int:
    labels = list(described.spec.get("labels", []))
    if spec["class_name"] in labels:
        return labels.index(spec["class_name"])
    index = spec.get("params", {}).get("class_index")
    if isinstance(index, int) and 0 <= index < len(labels):
        return index
    from service.jobs.tasks import _fail

    raise _fail(
        f"class {spec['class_name']!r} is not a label of model {spec['model']!r}; "
        "give params.class_index"
    )


def score_candidates(
    client: SyncTorchServeClient,
    described: DescribeResult,
    spec: dict[str, Any],
    candidates: list[dict[str, Any]],
    read_image: Callable[[str], bytes],
    batch_size: int,
    progress: Callable[[float], None],
) -> Scores:
    method = spec["method"]
    n = len(candidates)
    if method == "random":
        return Scores([None] * n)
    params = spec.get("params", {})
    class_index = _class_index(described, spec) if method == "probs" else None
    values: list[float | None] = []
    embeddings: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        batch = candidates[start : start + batch_size]
        images = [base64.b64encode(read_image(c["sha256"])).decode() for c in batch]
        if method == "adversarial":
            request = RobustnessRequest(
                images=images,
                method=params.get("attack", "ifgsm"),
                params=params.get("attack_params", {}),
            )
            result = client.call(spec["model"], request, RobustnessResult)
            values.extend(None if s is None else float(s) for s in result.steps_to_flip)
        else:
            embedded = client.call(spec["model"], EmbedRequest(images=images), EmbedResult)
            if method == "probs":
                probs = decode_array(embedded.probabilities)
                values.extend(float(p) for p in probs[:, class_index])
            else:
                embeddings.append(decode_array(embedded.embeddings).astype(np.float64))
                values.extend([None] * len(batch))
        progress(0.9 * min(n, start + batch_size) / n)
    return Scores(values, np.concatenate(embeddings) if embeddings else None)


def _mmd_select(embeddings: np.ndarray, m: int, params: dict[str, Any]) -> list[tuple[int, float]]:
    try:
        from handlers.criticism import selection  # torch-free, written with the criticism library
    except ImportError:
        from service.jobs.tasks import _fail

        raise _fail(
            "mmd criticism needs handlers.criticism.selection, which is not installed"
        ) from None
    picked = selection.select_criticisms(embeddings, m, **params)  # type: ignore[attr-defined]
    return [(int(i), float(s)) for i, s in picked]


def select(
    method: str, scores: Scores, m: int, params: dict[str, Any]
) -> list[tuple[int, float | None]]:
    """``m`` (candidate index, score) pairs, most critical first."""
    n = len(scores.values)
    if method == "random":
        rng = np.random.default_rng(int(params.get("seed", 0)))
        return [(int(i), None) for i in rng.choice(n, size=m, replace=False)]
    if method == "mmd":
        assert scores.embeddings is not None
        return list(_mmd_select(scores.embeddings, m, params))
    # probs: lowest probability first; adversarial: fewest steps first (never flipped = inf)
    keyed = [(math.inf if v is None else v, i) for i, v in enumerate(scores.values)]
    keyed.sort()
    return [(i, scores.values[i]) for _, i in keyed[:m]]

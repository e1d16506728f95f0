"""Inputs for the criticism job, fetched from TorchServe in batches, and the selection.

The worker gathers, for every image of the class, what the method needs: embeddings and
class probabilities (``embed`` task) for ``mmd`` and ``probs``, steps to flip (``robustness``
task) for ``adversarial``, nothing for ``random``; the selection math itself is the
torch-free ``protocol.criticism`` library. ``params`` of a criticism job are the selection
method's parameters plus three job-level keys: ``attack`` and ``attack_params`` (the
``robustness`` call of ``adversarial``) and ``class_index`` (when the class name is not
one of the model's labels). ``m`` is the number of criticisms.

A class larger than ``BEYOND_CHUNK_IMAGES`` is gathered in chunks, by any workers
(:mod:`service.jobs.fanout`), and :func:`join_inputs` joins their inputs for the selection,
which needs every image.

The batches go to TorchServe ``BEYOND_EMBED_CONCURRENCY`` at a time. The default, 1, leaves
the model's other TorchServe worker to interactive requests; more makes a large job faster
and interactive requests wait about one batch longer meanwhile (benchmarks/results/service.md).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from protocol.contract import (
    DescribeResult,
    EmbedRequest,
    EmbedResult,
    EncodedArray,
    RobustnessRequest,
    RobustnessResult,
)
from service.jobs.calls import in_batches
from service.torchserve_client import SyncTorchServeClient

if TYPE_CHECKING:  # the selection library is imported lazily (first criticism job)
    from protocol.criticism.methods import SelectedItem, Selection, SelectionInputs

JOB_KEYS = ("attack", "attack_params", "class_index")


def decode_array(encoded: EncodedArray) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(encoded.data)), allow_pickle=False)


def selection_params(params: dict[str, Any], m: int, n: int | None = None) -> dict[str, Any]:
    """``m`` prototypes and ``m`` criticisms [Stock2018, §3.3], at most ``n`` each;
    ``params.prototypes`` / ``params.criticisms`` override either count."""
    out = {k: v for k, v in params.items() if k not in JOB_KEYS}
    for key in ("prototypes", "criticisms"):
        count = out.get(key, m)
        out[key] = min(count, n) if n is not None and isinstance(count, int) else count
    return out


def check_params(method: str, params: dict[str, Any], m: int) -> str | None:
    """Why these criticism parameters are invalid, or None (used by the gateway: 422)."""
    from protocol.criticism.methods import get_selection
    from protocol.params.attacks import PARAMS_BY_ATTACK
    from protocol.validation import InvalidParameter, UnknownMethod, parse_params

    try:
        model = get_selection(method).params_model
        model.model_validate(selection_params(params, m))
    except (InvalidParameter, UnknownMethod, ValueError) as exc:
        return str(exc)
    if method != "adversarial":
        return None
    attack, attack_params = params.get("attack", "ifgsm"), params.get("attack_params", {})
    if attack not in PARAMS_BY_ATTACK:
        return f"attack: unknown attack {attack!r}; available: {', '.join(PARAMS_BY_ATTACK)}"
    if not isinstance(attack_params, dict):
        return "attack_params: must be a JSON object"
    try:
        parse_params(PARAMS_BY_ATTACK[attack], attack_params)
    except InvalidParameter as exc:
        return f"attack_params.{exc}"
    return None


def class_index(described: DescribeResult, class_name: str, params: dict[str, Any]) -> int | None:
    labels = list(described.spec.get("labels", []))
    if class_name in labels:
        return labels.index(class_name)
    index = params.get("class_index")
    if isinstance(index, int) and 0 <= index < len(labels):
        return index
    return None


def gather_inputs(
    client: SyncTorchServeClient,
    model: str,
    method: str,
    params: dict[str, Any],
    target: int | None,
    images: list[Callable[[], bytes]],
    batch_size: int,
    progress: Callable[[float], None],
    concurrency: int = 1,
) -> dict[str, Any]:
    """What the method needs of ``images`` as TorchServe answered it (float32 embeddings and
    class probabilities, steps to flip and robustness; only a count for ``random``): the
    inputs of one chunk, which :func:`join_inputs` joins with the others'."""
    n = len(images)
    if method == "random":
        return {"count": n}

    def fetch(readers: Sequence[Callable[[], bytes]]) -> RobustnessResult | EmbedResult:
        batch = [base64.b64encode(read()).decode() for read in readers]
        if method == "adversarial":
            request = RobustnessRequest(
                images=batch,
                method=params.get("attack", "ifgsm"),
                params=params.get("attack_params", {}),
            )
            return client.call(model, request, RobustnessResult)
        return client.call(model, EmbedRequest(images=batch), EmbedResult)

    embeddings, confidence, steps, robustness = [], [], [], []
    for result in in_batches(images, batch_size, fetch, concurrency, lambda done: progress(0.9 * done)):
        if isinstance(result, RobustnessResult):
            steps.extend(-1 if s is None else int(s) for s in result.steps_to_flip)
            robustness.extend(result.robustness)
        elif method == "probs":
            confidence.append(decode_array(result.probabilities)[:, target])
        else:
            embeddings.append(decode_array(result.embeddings))
    return {
        "embeddings": np.concatenate(embeddings) if embeddings else None,
        "confidence": np.concatenate(confidence) if confidence else None,
        "steps_to_flip": np.asarray(steps, dtype=np.int64) if steps else None,
        "robustness": np.asarray(robustness, dtype=np.float64) if len(robustness) == len(steps) and steps else None,
    }


def join_inputs(parts: list[dict[str, Any]]) -> SelectionInputs:
    """The selection's inputs from the :func:`gather_inputs` of consecutive image runs: each
    array joined (in float64 for the selection maths), absent if any run lacks it."""
    from protocol.criticism.methods import SelectionInputs

    def joined(key: str, dtype: type) -> np.ndarray | None:
        values = [part.get(key) for part in parts]
        return None if any(v is None for v in values) else np.concatenate(values).astype(dtype)

    counts = [part.get("count") for part in parts]
    return SelectionInputs(
        embeddings=joined("embeddings", np.float64),
        confidence=joined("confidence", np.float64),
        steps_to_flip=joined("steps_to_flip", np.int64),
        robustness=joined("robustness", np.float64),
        count=None if None in counts else sum(counts),
    )


def run_selection(
    method: str, inputs: SelectionInputs, params: dict[str, Any], m: int
) -> Selection:
    from protocol.criticism.methods import get_selection

    return get_selection(method).select(inputs, selection_params(params, m, inputs.n))


def selected_items(selected: Sequence[SelectedItem], candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen examples as the result lists them: rank, file, hash and score."""
    return [
        {
            "rank": rank,
            "file": candidates[item.index]["file"],
            "sha256": candidates[item.index]["sha256"],
            "score": item.score,
        }
        for rank, item in enumerate(selected, start=1)
    ]


def selection_gallery(read: Callable[[str], bytes], candidates: list[dict[str, Any]], selection: Selection) -> str:
    """Prototypes row over criticisms row [Stock2018, figs. 7-8], base64 PNG."""
    from protocol.criticism import gallery_png

    chosen = {item.index for item in [*selection.prototypes, *selection.criticisms]}
    images = {}
    for index in chosen:
        with Image.open(io.BytesIO(read(candidates[index]["sha256"]))) as img:
            images[index] = np.asarray(img.convert("RGB"))
    return base64.b64encode(gallery_png(images, selection)).decode("ascii")

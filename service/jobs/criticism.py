"""Inputs for the criticism job, fetched from TorchServe in batches, and the selection.

The worker gathers, for every image of the class, what the method needs: embeddings and
class probabilities (``embed`` task) for ``mmd`` and ``probs``, steps to flip (``robustness``
task) for ``adversarial``, nothing for ``random``; the selection math itself is the
torch-free ``handlers.criticism`` library. ``params`` of a criticism job are the selection
method's parameters plus three job-level keys: ``attack`` and ``attack_params`` (the
``robustness`` call of ``adversarial``) and ``class_index`` (when the class name is not
one of the model's labels). ``m`` is the number of criticisms.

The batches go to TorchServe ``BEYOND_EMBED_CONCURRENCY`` at a time. The default, 1, leaves
the model's other TorchServe worker to interactive requests; 2 on the demo archives (two
workers) made criticism of 2,000 images 1.3-1.45x faster (adversarial 15.4-16.5 -> 10.9-11.9 s)
and raised the p95 of ``/predict`` meanwhile from 22-231 to 370-450 ms, about one batch's
wait (``python -m benchmarks.jobs``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from handlers.contract import (
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
    from handlers.criticism.methods import Selection, SelectionInputs

JOB_KEYS = ("attack", "attack_params", "class_index")


def decode_array(encoded: EncodedArray) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(encoded.data)), allow_pickle=False)


def selection_params(params: dict[str, Any], m: int, n: int | None = None) -> dict[str, Any]:
    """``m`` prototypes and ``m`` criticisms (paper 000, section 3.3), at most ``n`` each;
    ``params.prototypes`` / ``params.criticisms`` override either count."""
    out = {k: v for k, v in params.items() if k not in JOB_KEYS}
    for key in ("prototypes", "criticisms"):
        count = out.get(key, m)
        out[key] = min(count, n) if n is not None and isinstance(count, int) else count
    return out


def check_params(method: str, params: dict[str, Any], m: int) -> str | None:
    """Why these criticism parameters are invalid, or None (used by the gateway: 422)."""
    from handlers.attacks.params import PARAMS_BY_ATTACK, library_names
    from handlers.criticism.methods import get_selection
    from handlers.validation import InvalidParameter, UnknownMethod, parse_params

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
        parse_params(PARAMS_BY_ATTACK[attack], library_names(attack_params))
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
) -> SelectionInputs:
    from handlers.criticism.methods import SelectionInputs

    n = len(images)
    if method == "random":
        return SelectionInputs(count=n)

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
            embeddings.append(decode_array(result.embeddings).astype(np.float64))
    return SelectionInputs(
        embeddings=np.concatenate(embeddings) if embeddings else None,
        confidence=np.concatenate(confidence).astype(np.float64) if confidence else None,
        steps_to_flip=np.asarray(steps, dtype=np.int64) if steps else None,
        robustness=np.asarray(robustness, dtype=np.float64) if len(robustness) == len(steps) and steps else None,
    )


def run_selection(
    method: str, inputs: SelectionInputs, params: dict[str, Any], m: int
) -> Selection:
    from handlers.criticism.methods import get_selection

    return get_selection(method).select(inputs, selection_params(params, m, inputs.n))

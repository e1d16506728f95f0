"""``attack``: one image's adversarial example [Stock2018], its pictures, and optionally the
explanation of the adversarial image [Stock2018, fig. 5]."""

from __future__ import annotations

import time
from typing import Any

import torch

from handlers.attacks import AttackBatchResult, get_attack
from handlers.attacks.pictures import adversarial_png, as_delivered, perturbation_png
from handlers.tasks.common import (
    checked_target,
    class_score,
    png_b64,
    probabilities,
    refusals,
    stamp,
    tensor,
)
from handlers.tasks.explain import explain_pixels
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.arrays import encode_array


@runs(contract.AttackRequest)
def run(served: ServedModel, request: contract.AttackRequest) -> contract.AttackResult:
    start = time.perf_counter()
    x = tensor(served, request.image)
    result, params = attacked(served, request.method, request.params, x)
    record = result.record(0)
    adversarial = result.adversarial[:1].to(served.device)
    png_probs = probabilities(served, as_delivered(adversarial))[0]
    png_class = int(png_probs.argmax())
    explanation = None
    if request.explanation is not None:
        options = request.explanation
        if options.target is None:  # [Stock2018, fig. 5]: the adversarial image for its new class
            options = options.model_copy(update={"target": record["prediction"]})
        explanation = explain_pixels(served, adversarial, options, time.perf_counter())
    return contract.AttackResult(
        method=request.method, params=params,
        original=class_score(served, record["clean_prediction"], record["clean_confidence"]),
        adversarial=class_score(served, record["prediction"], record["confidence"]),
        success=record["success"], steps_to_flip=record["steps_to_flip"],
        linf=record["linf"], l2=record["l2"],
        adversarial_png=png_b64(adversarial_png(result.adversarial[0])),
        png_prediction=class_score(served, png_class, float(png_probs[png_class])),
        perturbation_png=png_b64(perturbation_png(x[0].cpu(), result.adversarial[0])),
        adversarial_array=encode_array(result.adversarial[0].numpy()) if request.adversarial_array else None,
        explanation=explanation, **stamp(served, start),
    )


def attacked(served: ServedModel, method: str, params: dict[str, Any],
             x: torch.Tensor) -> tuple[AttackBatchResult, dict[str, Any]]:
    """Attack ``method`` with ``params`` (the API's names, as sent) run on the batch ``x``,
    and its parameters with defaults filled in, under the same names: what the reply echoes
    (422 for an unknown method, bad parameters or target class)."""
    with refusals():
        attack = get_attack(method, params)
        checked_target(served, attack.params.target_class, "target_class")
        return attack(served.model, x), attack.params.model_dump(mode="json")

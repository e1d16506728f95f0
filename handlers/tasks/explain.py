"""``explain``: one image's explanation as a stage map, its pictures, and optionally its APEM
score ([doValle2019, §4.2] for the stages, [doValle2019, ch. 3] for APEM)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from handlers import visualization
from handlers.explainers import Explanation, get_explainer
from handlers.tasks.apem import apem_score
from handlers.tasks.common import (
    check_colormap,
    checked,
    class_score,
    explanation,
    png_b64,
    probabilities,
    stamp,
    tensor,
)
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.arrays import encode_array
from protocol.params.metrics import ApemParams


@runs(contract.ExplainRequest)
def run(served: ServedModel, request: contract.ExplainRequest) -> contract.ExplainResult:
    start = time.perf_counter()
    return explain_pixels(served, tensor(served, request.image), request, start)


def explain_pixels(served: ServedModel, x: torch.Tensor, options: contract.ExplainOptions,
                   start: float) -> contract.ExplainResult:
    """Explain a ``(1, 3, S, S)`` pixel tensor as ``options`` say (also an attack's
    adversarial image)."""
    check_colormap(options.colormap)
    apem_params = checked(ApemParams, options.apem_params) if options.score == "apem" else None
    found = explanation(served, x, options.method, options.params, options.target)
    target = int(found.targets[0])
    probs = probabilities(served, x)[0]
    predicted = int(probs.argmax())
    stage_map = visualization.to_stage(found.relevance, x, options.stage)
    # APEM needs a map in [0, 1] of pixel relevance: stage 1 (signed) is scored as stage 2
    score_map = stage_map if options.stage != 1 else visualization.to_stage(found.relevance, x, 2)
    outputs = set(options.outputs)
    image = x[0].cpu()
    return contract.ExplainResult(
        method=found.method, params=found.params, target=target, stage=options.stage,
        prediction=class_score(served, predicted, float(probs[predicted])),
        relevance=encode_array(stage_map[0].cpu().numpy()) if "relevance" in outputs else None,
        extras=_extras(found),
        apem=None if apem_params is None else apem_score(served, x, score_map, target, apem_params),
        **_pictures(outputs, found, stage_map[0].cpu(), image, options.colormap), **stamp(served, start),
    )


def map_pictures(outputs: set[str], stage_map: torch.Tensor, image: torch.Tensor,
                 colormap: str) -> dict[str, str | None]:
    """The pictures of a [0, 1] map alone: ``heatmap_png`` and ``overlay_png``."""
    pictures: dict[str, str | None] = {}
    if "heatmap_png" in outputs:
        pictures["heatmap_png"] = png_b64(visualization.heatmap_png(stage_map, colormap))
    if "overlay_png" in outputs:
        pictures["overlay_png"] = png_b64(visualization.overlay_png(stage_map, image, colormap))
    return pictures


def _pictures(outputs: set[str], found: Explanation, stage_map: torch.Tensor,
              image: torch.Tensor, colormap: str) -> dict[str, str | None]:
    """The map's pictures, and those the method draws itself (:meth:`Explainer.pictures`)."""
    pictures = map_pictures(outputs, stage_map, image, colormap)
    own = get_explainer(found.method).pictures(found, image, outputs)
    return {**pictures, **{name: png_b64(data) for name, data in own.items()}}


def _extras(found: Explanation) -> dict[str, Any]:
    """Method-specific results of the one explained image, JSON-friendly."""
    extras: dict[str, Any] = {}
    for key, value in found.extras.items():
        item = value[0] if isinstance(value, list | np.ndarray) and len(value) else value
        if isinstance(item, np.ndarray):
            extras[key] = encode_array(item).model_dump()
        elif isinstance(item, torch.Tensor):
            extras[key] = encode_array(item.cpu().numpy()).model_dump()
        else:
            extras[key] = item.tolist() if hasattr(item, "tolist") else item
    return extras

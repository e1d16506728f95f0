"""A tiny HTTP stand-in for TorchServe speaking the contract (unit tests; and, with a delay
per answer, the latency-bound model server of ``benchmarks.scale``).

It checks the bearer token, parses every request with the contract's ``TaskRequest`` and
answers canned ``*Result`` bodies: one fake per contract task (:data:`FAKES`, declared with
:func:`fakes`; importing this module fails if a task has none), each answer validated by
the task's result model. ``state.mode`` switches it to 503 (busy), a handler ``ErrorBody``
400, or a hang, so the gateway's mapping can be tested.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from protocol import contract as c
from protocol.contract.registry import task_name
from protocol.frames import FrameError, decode_frame, is_frame

TOKEN = "fake-inference-token"
LABELS = ["circle", "square", "triangle"]
REQUESTS = TypeAdapter(c.TaskRequest)


def _arr(a: np.ndarray) -> dict[str, Any]:
    out = io.BytesIO()
    np.save(out, a.astype(np.float32))
    return {"data": base64.b64encode(out.getvalue()).decode(), "shape": list(a.shape)}


def _score(i: int, p: float) -> dict[str, Any]:
    return {"class_index": i, "label": LABELS[i], "probability": p}


class State:
    """``mode``: ok, busy, reject, hang, or held (every non-describe task waits for ``release``)."""

    mode = "ok"
    requests: list[dict[str, Any]] = []
    images: list[c.RawImage] = []  # the raw images received, pixels included
    time_limits: list[str | None] = []  # each request's X-Beyond-Time-Limit
    filter_calls_out_of_time = 0  # filter calls that answer stop="time_limit" (a partial map)
    filter_values_removed = 2  # per filter call
    most_images: int | None = None  # calls with more images answer 422 time_limit
    refused: str | None = None  # calls carrying this (base64) image answer 400 invalid_image
    delay_s = 0.0  # every answer waits this long first (asyncio.sleep: latency, no CPU; benchmarks.scale)
    release = threading.Event()
    waiting = 0


def _explanation(options: c.ExplainOptions) -> dict[str, Any]:
    return {
        "method": options.method,
        "params": options.params,
        "target": options.target or 0,
        "stage": options.stage,
        "prediction": _score(0, 0.7),
        "relevance": _arr(np.ones((8, 8))),
        "heatmap_png": "aGVhdA==",
        "overlay_png": "b3Zlcg==",
        "attention_png": "c3Vic2V0" if "attention_png" in options.outputs else None,
    }


def _mean_red(image: str) -> float:
    with Image.open(io.BytesIO(base64.b64decode(image))) as img:
        return float(np.asarray(img.convert("RGB"))[..., 0].mean())


def _red_level(image: str) -> int:
    return round(_mean_red(image))


def _raw_images(req: Any) -> list[c.RawImage]:
    found = [getattr(req, "image", None), *getattr(req, "images", [])]
    return [image for image in found if isinstance(image, c.RawImage)]


Fake = Callable[[Any, dict[str, Any]], dict[str, Any]]
FAKES: dict[str, Fake] = {}
"""Task name -> its canned answer ``fake(request, stamp)``; covers ``contract.TASKS``."""


def fakes(request: type[c.BaseModel]) -> Callable[[Fake], Fake]:
    """Declare the fake answer of ``request``'s task (``stamp``: the result's model fields)."""

    def register(function: Fake) -> Fake:
        FAKES[task_name(request)] = function
        return function

    return register


@fakes(c.DescribeRequest)
def _describe(req: c.DescribeRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "name": stamp["model"],
        "version": "1.0",
        "architecture": "resnet",
        "num_classes": 3,
        "labels": LABELS,
        "preprocessing": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3},
        "input_size": 64,
    }
    return {
        "spec": spec,
        "tasks": list(c.TASKS),
        "explainers": ["gradient", "smoothgrad"],
        "attacks": ["fgsm", "ifgsm", "pgd"],
    }


@fakes(c.PredictRequest)
def _predict(req: c.PredictRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    scores = [_score(0, 0.7), _score(1, 0.2), _score(2, 0.1)][: req.top_k]
    return {**stamp, "predictions": scores}


@fakes(c.ExplainRequest)
def _explain(req: c.ExplainRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    return {**stamp, **_explanation(req)}


@fakes(c.AttackRequest)
def _attack(req: c.AttackRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    return {
        **stamp,
        "method": req.method,
        "params": req.params,
        "original": _score(0, 0.7),
        "adversarial": _score(1, 0.6),
        "success": True,
        "steps_to_flip": 3,
        "linf": 0.03,
        "l2": 0.5,
        "adversarial_png": "YQ==",
        "png_prediction": _score(0, 0.55),
        "perturbation_png": "cA==",
        "adversarial_array": _arr(np.zeros((3, 8, 8))) if req.adversarial_array else None,
        "explanation": None if req.explanation is None else {**stamp, **_explanation(req.explanation)},
    }


@fakes(c.ApemRequest)
def _apem(req: c.ApemRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    return {
        **stamp,
        "eps_minus": 0.1,
        "eps_plus": 0.3,
        "apem": 0.2,
        "apem_norm": 0.5,
        "grid": {"n": 5},
        "params": {"max_steps": 5, **req.apem_params},
        "method": req.method,
        "method_params": req.params,
        "target": req.target or 0,
    }


@fakes(c.ApemSetRequest)
def _apem_set(req: c.ApemSetRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    """Values that grow with each image's mean red level."""
    red = [_mean_red(image) for image in req.images]
    return {
        **stamp,
        "method": req.method,
        "method_params": req.params,
        "params": {"max_steps": 2000, **req.apem_params},
        "grid": {"cap": 2001.0},
        "approximate": False,
        "targets": [0] * len(red),
        "eps_minus": [None if r == 0 else 100.0 + r for r in red],
        "eps_plus": [300.0 + 2 * r for r in red],
        "apem": [(300.0 + 2 * r) - (2001.0 if r == 0 else 100.0 + r) for r in red],
        "apem_norm": None,
        "losses": [r / 255 for r in red],
    }


@fakes(c.ClassFeaturesRequest)
def _class_features(req: c.ClassFeaturesRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    """Feature 3's importance and value grow with the red level."""
    red = np.array([_mean_red(image) for image in req.images])
    importance = np.stack([np.full_like(red, 1.0), np.full_like(red, 3.0), np.full_like(red, 2.0), red / 20], axis=1)
    values = np.stack([np.full_like(red, 0.5), np.full_like(red, 0.25), np.full_like(red, 0.1), red], axis=1)
    return {**stamp, "importance": _arr(importance), "values": _arr(values), "predictions": [0] * len(red)}


@fakes(c.NoiseSensitivityRequest)
def _noise_sensitivity(req: c.NoiseSensitivityRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    """Feature f flips every image once sigma * (f + 1) > 0.5."""
    n = len(req.images)
    return {
        **stamp,
        "sigmas": req.sigmas,
        "clean": [0] * n,
        "features": [[[1 if s * (f + 1) > 0.5 else 0] * n for s in req.sigmas] for f in req.features],
        "groups": [[[1 if s * max(g) > 0.5 else 0] * n for s in req.sigmas] for g in req.groups],
        "coverage": [[0.1 * f] * n for f in req.features],
    }


@fakes(c.MaskSensitivityRequest)
def _mask_sensitivity(req: c.MaskSensitivityRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    """Wrong once sigma x the mask's mean red level > 0.2."""
    level = [_mean_red(mask) / 255 for mask in req.masks]
    return {
        **stamp,
        "sigmas": req.sigmas,
        "clean": [0] * len(level),
        "predictions": [[1 if s * m > 0.2 else 0 for m in level] for s in req.sigmas],
        "coverage": level,
    }


@fakes(c.SufficientSubsetsRequest)
def _sufficient_subsets(req: c.SufficientSubsetsRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    """Subset size = red level / 255 (none when black)."""
    red = [_mean_red(image) / 255 for image in req.images]
    return {
        **stamp,
        "params": {"threshold": 0.9, "keep_fraction": 0.05, **req.params},
        "predictions": [0] * len(red),
        "sis_fraction": [r or None for r in red],
        "sis_confidence": [0.95 if r else None for r in red],
        "kept_fraction": 0.05,
        "kept_confidence": [1.0 - r for r in red],
        "kept_prediction": [0] * len(red),
        "confident_when_kept": [1.0 - r >= 0.9 for r in red],
        "region_share": {k: [_mean_red(m) / 255 if r else None for m, r in zip(masks, red, strict=True)]
                         for k, masks in req.regions.items()},
        "region_coverage": {k: [0.5] * len(red) for k in req.regions},
    }


@fakes(c.EmbedRequest)
def _embed(req: c.EmbedRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    n = len(req.images)
    probs = np.tile(np.array([0.6, 0.3, 0.1]), (n, 1))
    probs[:, 0] = np.linspace(0.9, 0.1, n) if n > 1 else 0.5
    return {
        **stamp,
        "embeddings": _arr(np.array([[r, r * 7 % 13, r * 3 % 5, 1.0] for r in map(_red_level, req.images)])),
        "probabilities": _arr(probs),
    }


@fakes(c.RobustnessRequest)
def _robustness(req: c.RobustnessRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    n = len(req.images)
    return {
        **stamp,
        "method": req.method,
        "params": req.params,
        "steps_to_flip": [None if r % 3 == 0 else 1 + r % 5 for r in map(_red_level, req.images)],
        "predictions": [0] * n,
        "adversarial_predictions": [1] * n,
    }


@fakes(c.FilterRequest)
def _filter(req: c.FilterRequest, stamp: dict[str, Any]) -> dict[str, Any]:
    """``State.filter_calls_out_of_time`` calls answer a partial map (``stop="time_limit"``)."""
    partial = State.filter_calls_out_of_time > 0
    State.filter_calls_out_of_time -= partial
    return {
        **stamp,
        "method": req.method,
        "params": req.params,
        "target": 0 if req.target is None else req.target,
        "filtered": _arr(np.full((3, 8, 8), 0.25 * (1 + State.filter_calls_out_of_time))),
        "apem_before": 0.2 if req.relevance is None else 0.25,
        "apem_after": 0.3,
        "fraction_kept": 0.5,
        "values_removed": State.filter_values_removed,
        "candidates_scored": 3,
        "distinct_values": 8 if req.relevance is None else 6,
        "stop": "time_limit" if partial else "apem_dropped",
    }


def answer(req: Any, model: str) -> dict[str, Any]:
    """The fake answer of ``req``'s task, checked against the task's result model."""
    body = FAKES[req.task](req, {"model": model, "version": "1.0", "elapsed_ms": 1.0})
    c.TASKS[req.task].result.model_validate(body)
    return body


if set(FAKES) != set(c.TASKS):
    raise ImportError(f"fake answers and contract tasks differ: {sorted(set(FAKES) ^ set(c.TASKS))}")


async def predictions(request: Request) -> JSONResponse:
    model = request.path_params["model"]
    if request.headers.get("authorization") != f"Bearer {TOKEN}":
        return JSONResponse({"code": 401, "type": "Unauthorized", "message": "token"}, 401)
    if State.mode == "busy":
        return JSONResponse(
            {"code": 503, "type": "ServiceUnavailableException", "message": "Model has no worker"},
            503,
        )
    if State.mode == "hang":
        await asyncio.sleep(30)
    await asyncio.sleep(State.delay_s)
    if model not in ("shapes-resnet", "shapes-vgg"):
        return JSONResponse({"code": 404, "type": "ModelNotFoundException", "message": "no"}, 404)
    body = await request.body()
    try:
        req = REQUESTS.validate_python(decode_frame(body)) if is_frame(body) else REQUESTS.validate_json(body)
        State.images.extend(_raw_images(req))
    except (ValidationError, FrameError) as exc:
        return JSONResponse({"error": {"code": "invalid_request", "message": str(exc)[:100]}}, 400)
    State.requests.append(req.model_dump())
    State.time_limits.append(request.headers.get(c.TIME_LIMIT_HEADER))
    if State.mode == "held" and req.task != "describe":
        State.waiting += 1
        while not State.release.is_set():
            await asyncio.sleep(0.005)
    if State.refused is not None and State.refused in getattr(req, "images", []):
        return JSONResponse({"error": {"code": "invalid_image", "message": "the image is unreadable"}}, 400)
    if State.most_images is not None and len(getattr(req, "images", [])) > State.most_images:
        message = "the APEM flip search did not finish within the 540 s this call may work: ..."
        return JSONResponse({"error": {"code": "time_limit", "message": message}}, 422)
    if State.mode == "reject":
        return JSONResponse(
            {"error": {"code": "invalid_params", "message": "sigma must be > 0"}}, 400
        )
    return JSONResponse(answer(req, model))


async def ping(_: Request) -> JSONResponse:
    return JSONResponse({"status": "Healthy"})


app = Starlette(
    routes=[Route("/ping", ping), Route("/predictions/{model}", predictions, methods=["POST"])]
)

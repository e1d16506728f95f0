"""The RQ job functions (module-level, one JSON ``spec`` argument each).

Job bodies are idempotent: they read inputs (dataset manifest and images, the model's
answers), compute, and return the result for RQ to store; they write nothing else, and
every random choice is seeded from the spec, so a retried job gives the same result and
leaves no duplicate side effect. Progress goes to ``job.meta["progress"]``; a failure
that retrying cannot fix raises :class:`JobFailure` (not retried, reason shown to clients).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from rq import get_current_job

from handlers.contract import FilterRequest, FilterResult
from service.datasets import DatasetStore
from service.errors import ApiError
from service.jobs.audit import audit_class
from service.jobs.criticism import class_index, gather_inputs, run_selection
from service.jobs.evaluation import probabilities, read_votes
from service.jobs.evaluation import summarise as summarise_evaluation
from service.jobs.overinterpretation import by_class, score_subsets, subset_gallery
from service.jobs.overinterpretation import summarise as summarise_subsets
from service.jobs.reliability import sample, score_images, summarise
from service.settings import Settings, get_settings
from service.torchserve_client import SyncTorchServeClient

log = logging.getLogger("beyond.jobs")


class JobFailure(Exception):
    """A job failure with a client-facing reason; never retried."""


def set_progress(value: float) -> None:
    job = get_current_job()
    if job is not None:
        job.meta["progress"] = round(max(0.0, min(1.0, value)), 4)
        job.save_meta()


def _fail(message: str) -> JobFailure:
    job = get_current_job()
    if job is not None:
        job.meta["error"] = message
        job.save_meta()
    return JobFailure(message)


def _guarded(
    body: Callable[[dict[str, Any]], dict[str, Any]], spec: dict[str, Any]
) -> dict[str, Any]:
    try:
        return body(spec)
    except JobFailure:
        raise
    except ApiError as exc:
        if exc.status in (503, 504):  # transient: let RQ retry it
            job = get_current_job()
            if job is not None:
                job.meta["error"] = f"model server unavailable: {exc.message}"
                job.save_meta()
            raise
        raise _fail(f"{exc.code}: {exc.message}") from None


def _items(selection_items: list[Any], candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "rank": rank,
            "file": candidates[item.index]["file"],
            "sha256": candidates[item.index]["sha256"],
            "score": item.score,
        }
        for rank, item in enumerate(selection_items, start=1)
    ]


def _gallery(store: DatasetStore, candidates: list[dict[str, Any]], selection: Any) -> str:
    """Prototypes row over criticisms row (paper 000, figures 7-8), base64 PNG."""
    from handlers.criticism import gallery_png

    chosen = {item.index for item in [*selection.prototypes, *selection.criticisms]}
    images = {}
    for index in chosen:
        with Image.open(io.BytesIO(store.read_image(candidates[index]["sha256"]))) as img:
            images[index] = np.asarray(img.convert("RGB"))
    return base64.b64encode(gallery_png(images, selection)).decode("ascii")


def _images_in_scope(store: DatasetStore, dataset_id: str, class_name: str | None) -> list[dict[str, Any]]:
    """The dataset's images of ``class_name`` (all of them for None); a job failure if none."""
    manifest = store.get(dataset_id)
    if manifest is None:
        raise _fail("dataset not found (deleted?)")
    images = [i for i in manifest["images"] if class_name is None or i["class_name"] == class_name]
    if not images:
        raise _fail(f"the dataset has no image of class {class_name!r}")
    return images


def _result_head(job_type: str, spec: dict[str, Any], described: Any) -> dict[str, Any]:
    """The keys every dataset job's result starts with: what produced it, and on what."""
    return {
        "type": job_type,
        "model": spec["model"],
        "version": str(described.spec.get("version", "")),
        "dataset_id": spec["dataset_id"],
        "class_name": spec.get("class_name"),
    }


def _begin(spec: dict[str, Any]) -> tuple[float, Settings, DatasetStore, list[dict[str, Any]]]:
    """A dataset job's start: its clock, the settings, the store and the images in scope."""
    start = time.perf_counter()
    settings = get_settings()
    set_progress(0.0)
    store = DatasetStore(settings)
    return start, settings, store, _images_in_scope(store, spec["dataset_id"], spec.get("class_name"))


def _labelled(client: SyncTorchServeClient, model: str, images: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    """The model's description and labels; a job failure if an image's class is not a label."""
    described = client.describe(model)
    model_labels = list(described.spec.get("labels", []))
    unknown = sorted({i["class_name"] for i in images} - set(model_labels))
    if unknown:
        raise _fail(f"classes that are not labels of the model: {', '.join(unknown)}")
    return described, model_labels


class Sample(NamedTuple):
    """A sampled dataset job's images and what the model says their classes are."""

    described: Any
    model_labels: list[str]
    images: list[dict[str, Any]]
    labels: list[int]
    """each image's class as an index among ``model_labels``"""


def _sampled(client: SyncTorchServeClient, spec: dict[str, Any], in_scope: list[dict[str, Any]]) -> Sample:
    """The job's seeded sample of the images in scope, with the model's description and
    labels (a job failure if an image's class is not one of them)."""
    images = sample(in_scope, int(spec["max_images"]), int(spec["seed"]))
    described, model_labels = _labelled(client, spec["model"], images)
    index_of: dict[str, int] = {}
    for index, name in enumerate(model_labels):
        index_of.setdefault(name, index)  # list.index's answer, without a scan per image
    return Sample(described, model_labels, images, [index_of[i["class_name"]] for i in images])


def _elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _sampled_result(job_type: str, spec: dict[str, Any], described: Any, start: float, body: dict[str, Any]) -> dict[str, Any]:
    """A sampled dataset job's result: what produced it, on which sample, ``body``, its time."""
    return {
        **_result_head(job_type, spec, described),
        "max_images": int(spec["max_images"]),
        "seed": int(spec["seed"]),
        **body,
        "elapsed_ms": _elapsed_ms(start),
    }


def _criticism(spec: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    settings = get_settings()
    set_progress(0.0)
    store = DatasetStore(settings)
    candidates = _images_in_scope(store, spec["dataset_id"], spec["class_name"])
    params = spec.get("params", {})
    with SyncTorchServeClient(settings) as client:
        described = client.describe(spec["model"])
        target = class_index(described, spec["class_name"], params)
        if target is None and spec["method"] == "probs":
            raise _fail(
                f"class {spec['class_name']!r} is not a label of the model; give params.class_index"
            )
        readers = [lambda sha=c["sha256"]: store.read_image(sha) for c in candidates]
        inputs = gather_inputs(
            client,
            spec["model"],
            spec["method"],
            params,
            target,
            readers,
            settings.embed_batch_size,
            set_progress,
            settings.embed_concurrency,
        )
    try:
        selection = run_selection(spec["method"], inputs, params, int(spec["m"]))
    except (LookupError, ValueError) as exc:  # the library's InvalidParameter / UnknownMethod
        raise _fail(f"invalid criticism parameters: {exc}") from None
    set_progress(1.0)
    return {
        **_result_head("criticism", spec, described),
        "method": spec["method"],
        "m": int(spec["m"]),
        "params": selection.params,
        "n_candidates": len(candidates),
        "score_name": selection.score_name,
        "prototypes": _items(selection.prototypes, candidates),
        "criticisms": _items(selection.criticisms, candidates),
        "details": selection.details,
        "gallery_png": _gallery(store, candidates, selection),
        "elapsed_ms": _elapsed_ms(start),
    }


def _filter(spec: dict[str, Any]) -> dict[str, Any]:
    """One filter call, or as many as it takes: a call that runs out of the model server's
    time returns the map Algorithm 2 had reached (``stop="time_limit"``, after at least one
    candidate), and the next call filters that map with the same target."""
    start = time.perf_counter()
    settings = get_settings()
    set_progress(0.0)
    request = FilterRequest(
        image=spec["image"],
        method=spec["method"],
        params=spec.get("params", {}),
        target=spec.get("target"),
        apem_params=spec.get("apem_params", {}),
        filter_params=spec.get("filter_params", {}),
    )
    calls: list[FilterResult] = []
    with SyncTorchServeClient(settings) as client:
        while True:
            calls.append(client.call(spec["model"], request, FilterResult))
            if calls[-1].stop != "time_limit":
                break
            if calls[-1].values_removed == 0:  # the handler returns only after progress
                raise _fail("filter: a model-server call made no progress; use fewer filter_params.levels")
            removed = sum(call.values_removed for call in calls)
            set_progress(min(0.99, removed / max(1, calls[0].distinct_values)))
            request = request.model_copy(
                update={"method": None, "params": {}, "relevance": calls[-1].filtered, "target": calls[-1].target}
            )
    set_progress(1.0)
    first, last = calls[0], calls[-1]
    out = last.model_dump(mode="json")
    out.update(
        type="filter",
        method=first.method,
        params=first.params,
        apem_before=first.apem_before,
        values_removed=sum(call.values_removed for call in calls),
        candidates_scored=sum(call.candidates_scored for call in calls),
        fraction_kept=math.prod(call.fraction_kept for call in calls),
        distinct_values=first.distinct_values,
        calls=len(calls),
        elapsed_ms=_elapsed_ms(start),
    )
    return out


def _apem(spec: dict[str, Any]) -> dict[str, Any]:
    start, settings, store, in_scope = _begin(spec)
    with SyncTorchServeClient(settings) as client:
        chosen = _sampled(client, spec, in_scope)
        results = score_images(
            client, spec, chosen.images, chosen.labels, store.read_image, set_progress, settings.embed_concurrency
        )
    set_progress(1.0)
    return _sampled_result("apem", spec, chosen.described, start, {
        "method": spec["method"],
        "n_candidates": len(in_scope),
        **summarise(chosen.images, chosen.labels, results),
    })


def _audit(spec: dict[str, Any]) -> dict[str, Any]:
    start, settings, store, in_scope = _begin(spec)
    class_names = sorted({i["class_name"] for i in in_scope})
    with SyncTorchServeClient(settings) as client:
        described, model_labels = _labelled(client, spec["model"], in_scope)
        classes = []
        for done, class_name in enumerate(class_names):
            images = sample([i for i in in_scope if i["class_name"] == class_name], int(spec["max_images"]), int(spec["seed"]))

            def progress(value: float, done: int = done) -> None:
                set_progress((done + value) / len(class_names))

            audited = audit_class(
                client, spec, images, model_labels.index(class_name), store.read_image, progress,
                settings.embed_concurrency,
            )
            classes.append({"class_name": class_name, "label": model_labels.index(class_name), **audited})
    set_progress(1.0)
    return _sampled_result("audit", spec, described, start, {
        "sigmas": list(spec["sigmas"]),
        "top_k": int(spec["top_k"]),
        "gallery_images": int(spec["gallery_images"]),
        "groups": dict(spec.get("groups") or {}),
        "classes": classes,
    })


def _evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    start, settings, store, in_scope = _begin(spec)
    manifest = store.get(spec["dataset_id"])
    try:
        votes = read_votes(manifest.get("metadata") if manifest else None)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    with SyncTorchServeClient(settings) as client:
        chosen = _sampled(client, spec, in_scope)
        probs = probabilities(
            client, spec["model"], chosen.images, store.read_image, settings.embed_batch_size, set_progress,
            settings.embed_concurrency,
        )
    set_progress(1.0)
    return _sampled_result("evaluate", spec, chosen.described, start, {
        "agreement": float(spec["agreement"]),
        "review_limit": int(spec["review_limit"]),
        "n_candidates": len(in_scope),
        **summarise_evaluation(chosen.images, probs, chosen.model_labels, votes, spec),
    })


def _overinterpretation(spec: dict[str, Any]) -> dict[str, Any]:
    start, settings, store, in_scope = _begin(spec)
    with SyncTorchServeClient(settings) as client:
        chosen = _sampled(client, spec, in_scope)
        params, rows = score_subsets(
            client, spec, chosen.images, chosen.labels, store.read_image, set_progress, settings.embed_concurrency
        )
        gallery = subset_gallery(client, spec, rows, store.read_image)
    set_progress(1.0)
    return _sampled_result("overinterpretation", spec, chosen.described, start, {
        "params": params,
        "gallery_images": int(spec["gallery_images"]),
        "n_candidates": len(in_scope),
        "kept_fraction": rows[0]["kept_fraction"],
        **summarise_subsets(rows),
        "per_class": by_class(rows),
        "gallery": gallery,
        "items": rows,
    })


def run_criticism(spec: dict[str, Any]) -> dict[str, Any]:
    """Model criticism on one class of a dataset (thesis 003): the ``m`` least typical images."""
    return _guarded(_criticism, spec)


def run_filter(spec: dict[str, Any]) -> dict[str, Any]:
    """Explanation Filter on one image (thesis 003, Algorithm 2), computed by TorchServe."""
    return _guarded(_filter, spec)


def run_apem(spec: dict[str, Any]) -> dict[str, Any]:
    """APEM of an explanation method over a dataset, with its Spearman correlation with
    the loss (thesis 003, chapter 3 and section 5.4), computed by TorchServe in batches."""
    return _guarded(_apem, spec)


def run_evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """Top-1 and top-k error of a dataset, rectified by its human votes (paper 000,
    section 3.1), from TorchServe's class probabilities in batches."""
    return _guarded(_evaluate, spec)


def run_audit(spec: dict[str, Any]) -> dict[str, Any]:
    """Spurious-feature audit of a dataset's classes (paper 002, sections 3.2 and 5),
    the noise predictions computed by TorchServe in batches."""
    return _guarded(_audit, spec)


def run_overinterpretation(spec: dict[str, Any]) -> dict[str, Any]:
    """Overinterpretation of a dataset (paper 004): each image's sufficient input subset
    and the confidence left with 95 % of it masked, computed by TorchServe in batches."""
    return _guarded(_overinterpretation, spec)

"""The RQ job functions (module-level, one JSON ``spec`` argument each), and how each dataset
job splits (:mod:`service.jobs.fanout`).

Job bodies are idempotent: they read inputs (dataset manifest and images, the model's
answers), compute, and return the result for RQ to store; they write nothing else, and
every random choice is seeded from the spec, so a retried job or chunk gives the same
result and leaves no duplicate side effect. Progress goes to ``job.meta["progress"]``; a
failure that retrying cannot fix raises :class:`JobFailure` (not retried, reason shown to
clients). Each dataset job type is a :class:`~service.jobs.fanout.Split`: ``run_<type>``
maps its whole image list and reduces that one part; a fanned-out job's chunks are mapped
by :func:`run_chunk` and their parts reduced by :func:`run_reduce`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import groupby
from typing import Any

import numpy as np
from rq import get_current_job
from rq.job import JobStatus

from protocol.contract import ApemSetResult, FilterRequest, FilterResult
from service.datasets import DatasetStore
from service.errors import ApiError
from service.jobs import queue as jobq
from service.jobs.audit import audit_class
from service.jobs.criticism import (
    class_index,
    gather_inputs,
    join_inputs,
    run_selection,
    selected_items,
    selection_gallery,
)
from service.jobs.evaluation import probabilities, read_votes
from service.jobs.evaluation import summarise as summarise_evaluation
from service.jobs.fanout import (
    SPLITS,
    Part,
    Run,
    Spec,
    Split,
    calls,
    decode_part,
    encode_part,
    splits,
)
from service.jobs.overinterpretation import (
    by_class,
    images_per_call,
    in_call_order,
    mask_kinds,
    score_subsets,
    subset_gallery,
)
from service.jobs.overinterpretation import summarise as summarise_subsets
from service.jobs.reliability import IMAGES_PER_CALL as APEM_IMAGES_PER_CALL
from service.jobs.reliability import sample, score_images, summarise
from service.settings import Settings, get_settings
from service.torchserve_client import SyncTorchServeClient

log = logging.getLogger("beyond.jobs")
Manifest = dict[str, Any]
CHUNKS_KEPT_S = 3600
"""How long a fanned-out job's chunks (and their parts) stay in Redis once its reduce has
run: time for a retried reduce, not the result TTL's days."""


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


# ------------------------------------------------------------------ running a split


@contextmanager
def _opened(spec: Spec, settings: Settings, started: float) -> Iterator[tuple[Split, Run]]:
    """The job type's split and what its map and reduce work with; a job failure when the
    dataset is gone or has no image in scope."""
    set_progress(0.0)
    split = SPLITS[spec["type"]]
    store = DatasetStore(settings)
    manifest = store.get(spec["dataset_id"])
    if manifest is None:
        raise _fail("dataset not found (deleted?)")
    images = split.images(spec, manifest, settings)
    if not images:
        raise _fail(f"the dataset has no image of class {spec.get('class_name')!r}")
    with SyncTorchServeClient(settings) as client:
        described = client.describe(spec["model"])
        yield split, Run(spec, settings, store, manifest, client, described, images, started, set_progress)


def _whole(spec: Spec) -> dict[str, Any]:
    """A dataset job in one RQ job: its whole image list mapped, that one part reduced."""
    with _opened(spec, get_settings(), time.time()) as (split, run):
        part = split.map(run, run.images)
        set_progress(1.0)
        return split.reduce(run, [part])


def _chunk(spec: Spec) -> dict[str, Any]:
    """One chunk of a fanned-out job: the part of its slice ``spec["chunk"]``, as JSON."""
    start, stop = spec["chunk"]
    with _opened(spec, get_settings(), time.time()) as (split, run):
        part = split.map(run, run.images[start:stop])
    set_progress(1.0)
    return encode_part(part)


def _reduce(spec: Spec) -> dict[str, Any]:
    """A fanned-out job's result from its chunks' parts, once every chunk has ended; a
    chunk that failed (or expired) fails the job with its reason. The chunks expire soon
    after, whatever the outcome."""
    job = get_current_job()
    assert job is not None, "a reduce runs in an RQ worker"
    listed, chunks = job.meta["chunks"], jobq.chunks_of(job)
    try:
        for entry, chunk in zip(listed, chunks, strict=True):
            if chunk is None or chunk.get_status(refresh=False) != JobStatus.FINISHED:
                reason = "its part has expired" if chunk is None else jobq.failure_reason(chunk) or "it did not finish"
                raise _fail(f"{reason} (the chunk of images {entry['start']}-{entry['stop']})")
        finished = [chunk for chunk in chunks if chunk is not None]
        started = min(chunk.started_at.timestamp() for chunk in finished if chunk.started_at)
        with _opened(spec, get_settings(), started) as (split, run):
            if listed[-1]["stop"] != len(run.images):  # the gateway planned with other code
                raise _fail("the job's image list changed after it was split; submit it again")
            return split.reduce(run, [decode_part(chunk.return_value()) for chunk in finished])
    finally:
        jobq.expire_chunks(job.connection, [chunk for chunk in chunks if chunk is not None], CHUNKS_KEPT_S)


# ------------------------------------------------------------------ shared by the splits


def _in_scope(spec: Spec, manifest: Manifest) -> list[dict[str, Any]]:
    """The dataset's images of ``spec["class_name"]`` (all of them for None)."""
    class_name = spec.get("class_name")
    return [i for i in manifest["images"] if class_name is None or i["class_name"] == class_name]


def _sample(spec: Spec, manifest: Manifest) -> list[dict[str, Any]]:
    """The job's seeded sample of at most ``max_images`` of the images in scope."""
    return sample(_in_scope(spec, manifest), int(spec["max_images"]), int(spec["seed"]))


def _labels(run: Run, images: list[dict[str, Any]]) -> tuple[list[str], list[int]]:
    """The model's labels, and each image's class as an index among them; a job failure if
    an image's class is not a label."""
    model_labels = list(run.described.spec.get("labels", []))
    index_of: dict[str, int] = {}
    for index, name in enumerate(model_labels):
        index_of.setdefault(name, index)  # list.index's answer, without a scan per image
    unknown = sorted({i["class_name"] for i in images} - index_of.keys())
    if unknown:
        raise _fail(f"classes that are not labels of the model: {', '.join(unknown)}")
    return model_labels, [index_of[i["class_name"]] for i in images]


def _elapsed_ms(start: float) -> float:
    return round((time.time() - start) * 1000, 3)


def _result(job_type: str, run: Run, body: dict[str, Any]) -> dict[str, Any]:
    """A dataset job's result: what produced it and on what, ``body``, its time."""
    spec = run.spec
    return {
        "type": job_type,
        "model": spec["model"],
        "version": str(run.described.spec.get("version", "")),
        "dataset_id": spec["dataset_id"],
        "class_name": spec.get("class_name"),
        **body,
        "elapsed_ms": _elapsed_ms(run.started),
    }


def _sampling(run: Run) -> dict[str, Any]:
    """A sampled job's result keys saying which sample it is."""
    return {"max_images": int(run.spec["max_images"]), "seed": int(run.spec["seed"])}


# ------------------------------------------------------------------ the dataset jobs


@splits("criticism")
class Criticism(Split):
    """Model criticism on one class (thesis 003): each chunk gathers its images' inputs
    (steps to flip, embeddings or probabilities); the selection is over all of them (for
    ``mmd``, MMD-critic's kernel over every embedding), so it is the reduce's."""

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[dict[str, Any]]:
        return _in_scope(spec, manifest)

    def units(self, spec: Spec, images: list[dict[str, Any]], settings: Settings) -> list[int]:
        if spec["method"] == "random":  # no model calls: nothing to spread
            return [len(images)]
        return calls(len(images), settings.embed_batch_size)

    def map(self, run: Run, images: list[dict[str, Any]]) -> Part:
        spec, params = run.spec, run.spec.get("params", {})
        target = class_index(run.described, spec["class_name"], params)
        if target is None and spec["method"] == "probs":
            raise _fail(f"class {spec['class_name']!r} is not a label of the model; give params.class_index")
        readers = [lambda sha=c["sha256"]: run.store.read_image(sha) for c in images]
        return gather_inputs(
            run.client, spec["model"], spec["method"], params, target, readers,
            run.settings.embed_batch_size, run.progress, run.settings.embed_concurrency,
        )

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        spec, candidates = run.spec, run.images
        try:
            selection = run_selection(spec["method"], join_inputs(parts), spec.get("params", {}), int(spec["m"]))
        except (LookupError, ValueError) as exc:  # the library's InvalidParameter / UnknownMethod
            raise _fail(f"invalid criticism parameters: {exc}") from None
        return _result("criticism", run, {
            "method": spec["method"],
            "m": int(spec["m"]),
            "params": selection.params,
            "n_candidates": len(candidates),
            "score_name": selection.score_name,
            "prototypes": selected_items(selection.prototypes, candidates),
            "criticisms": selected_items(selection.criticisms, candidates),
            "details": selection.details,
            "gallery_png": selection_gallery(run.store.read_image, candidates, selection),
        })


@splits("apem")
class Apem(Split):
    """APEM of one explanation method over a dataset (thesis 003, chapter 3): each chunk's
    images are scored in TorchServe; the means and the Spearman correlation with the loss
    (section 5.4) are over every image, in the reduce."""

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[dict[str, Any]]:
        return _sample(spec, manifest)

    def units(self, spec: Spec, images: list[dict[str, Any]], settings: Settings) -> list[int]:
        return calls(len(images), APEM_IMAGES_PER_CALL)

    def map(self, run: Run, images: list[dict[str, Any]]) -> Part:
        _, labels = _labels(run, images)
        results = score_images(
            run.client, run.spec, images, labels, run.store.read_image, run.progress, run.settings.embed_concurrency
        )
        return {"results": [result.model_dump(mode="json") for result in results]}

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        _, labels = _labels(run, run.images)
        results = [ApemSetResult.model_validate(result) for part in parts for result in part["results"]]
        return _result("apem", run, {
            **_sampling(run),
            "method": run.spec["method"],
            "n_candidates": len(_in_scope(run.spec, run.manifest)),
            **summarise(run.images, labels, results),
        })


@splits("evaluate")
class Evaluate(Split):
    """Top-1 and top-k error of a dataset, rectified by its votes (paper 000, section 3.1):
    each chunk's class probabilities come from TorchServe; the errors, confusions and the
    images to review are counted over every image, in the reduce."""

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[dict[str, Any]]:
        return _sample(spec, manifest)

    def units(self, spec: Spec, images: list[dict[str, Any]], settings: Settings) -> list[int]:
        return calls(len(images), settings.embed_batch_size)

    def map(self, run: Run, images: list[dict[str, Any]]) -> Part:
        _labels(run, images)
        probs = probabilities(
            run.client, run.spec["model"], images, run.store.read_image, run.settings.embed_batch_size,
            run.progress, run.settings.embed_concurrency,
        )
        return {"probabilities": probs}

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        model_labels, _ = _labels(run, run.images)
        try:
            votes = read_votes(run.manifest.get("metadata"))
        except ValueError as exc:
            raise _fail(str(exc)) from None
        probs = np.concatenate([part["probabilities"] for part in parts])
        return _result("evaluate", run, {
            **_sampling(run),
            "agreement": float(run.spec["agreement"]),
            "review_limit": int(run.spec["review_limit"]),
            "n_candidates": len(_in_scope(run.spec, run.manifest)),
            **summarise_evaluation(run.images, probs, model_labels, votes, run.spec),
        })


@splits("overinterpretation")
class Overinterpretation(Split):
    """Overinterpretation of a dataset (paper 004): each chunk's sufficient input subsets
    come from TorchServe; the summaries overall and per class, and the gallery of the
    smallest subsets, are over every image, in the reduce. The list is in call order
    (grouped by the region masks uploaded); the result lists the images in sample order."""

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[dict[str, Any]]:
        return in_call_order(_sample(spec, manifest))

    def units(self, spec: Spec, images: list[dict[str, Any]], settings: Settings) -> list[int]:
        per_call = images_per_call(spec.get("params", {}))
        return [size for _, group in groupby(images, key=mask_kinds) for size in calls(len(list(group)), per_call)]

    def map(self, run: Run, images: list[dict[str, Any]]) -> Part:
        _, labels = _labels(run, images)
        params, rows = score_subsets(
            run.client, run.spec, images, labels, run.store.read_image, run.progress, run.settings.embed_concurrency
        )
        return {"params": params, "rows": rows}

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        in_sample = {item["file"]: k for k, item in enumerate(_sample(run.spec, run.manifest))}
        rows = sorted((row for part in parts for row in part["rows"]), key=lambda row: in_sample[row["file"]])
        return _result("overinterpretation", run, {
            **_sampling(run),
            "params": parts[-1]["params"],
            "gallery_images": int(run.spec["gallery_images"]),
            "n_candidates": len(_in_scope(run.spec, run.manifest)),
            "kept_fraction": rows[0]["kept_fraction"],
            **summarise_subsets(rows),
            "per_class": by_class(rows),
            "gallery": subset_gallery(run.client, run.spec, rows, run.store.read_image),
            "items": rows,
        })


@splits("audit")
class Audit(Split):
    """Spurious-feature audit (paper 002, sections 3.2 and 5), one class at a time: a class's
    feature ranking decides which features its noise calls corrupt, so a class stays in one
    chunk and chunks hold whole classes; the reduce lists them."""

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[dict[str, Any]]:
        in_scope = _in_scope(spec, manifest)
        return [
            image
            for name in sorted({i["class_name"] for i in in_scope})
            for image in sample([i for i in in_scope if i["class_name"] == name], int(spec["max_images"]), int(spec["seed"]))
        ]

    def units(self, spec: Spec, images: list[dict[str, Any]], settings: Settings) -> list[int]:
        return [len(list(group)) for _, group in groupby(images, key=lambda i: i["class_name"])]

    def map(self, run: Run, images: list[dict[str, Any]]) -> Part:
        model_labels, _ = _labels(run, images)
        names = list(dict.fromkeys(i["class_name"] for i in images))
        classes = []
        for done, name in enumerate(names):

            def progress(value: float, done: int = done) -> None:
                run.progress((done + value) / len(names))

            label = model_labels.index(name)
            members = [i for i in images if i["class_name"] == name]
            audited = audit_class(
                run.client, run.spec, members, label, run.store.read_image, progress, run.settings.embed_concurrency
            )
            classes.append({"class_name": name, "label": label, **audited})
        return {"classes": classes}

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        return _result("audit", run, {
            **_sampling(run),
            "sigmas": list(run.spec["sigmas"]),
            "top_k": int(run.spec["top_k"]),
            "gallery_images": int(run.spec["gallery_images"]),
            "groups": dict(run.spec.get("groups") or {}),
            "classes": [audited for part in parts for audited in part["classes"]],
        })


# ------------------------------------------------------------------ one image: the filter


def _filter(spec: dict[str, Any]) -> dict[str, Any]:
    """One filter call, or as many as it takes: a call that runs out of the model server's
    time returns the map Algorithm 2 had reached (``stop="time_limit"``, after at least one
    candidate), and the next call filters that map with the same target."""
    start = time.time()
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


# ------------------------------------------------------------------ entry points (RQ functions)


def run_criticism(spec: dict[str, Any]) -> dict[str, Any]:
    """Model criticism on one class of a dataset (thesis 003): the ``m`` least typical images."""
    return _guarded(_whole, spec)


def run_filter(spec: dict[str, Any]) -> dict[str, Any]:
    """Explanation Filter on one image (thesis 003, Algorithm 2), computed by TorchServe."""
    return _guarded(_filter, spec)


def run_apem(spec: dict[str, Any]) -> dict[str, Any]:
    """APEM of an explanation method over a dataset, with its Spearman correlation with
    the loss (thesis 003, chapter 3 and section 5.4), computed by TorchServe in batches."""
    return _guarded(_whole, spec)


def run_evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """Top-1 and top-k error of a dataset, rectified by its human votes (paper 000,
    section 3.1), from TorchServe's class probabilities in batches."""
    return _guarded(_whole, spec)


def run_audit(spec: dict[str, Any]) -> dict[str, Any]:
    """Spurious-feature audit of a dataset's classes (paper 002, sections 3.2 and 5),
    the noise predictions computed by TorchServe in batches."""
    return _guarded(_whole, spec)


def run_overinterpretation(spec: dict[str, Any]) -> dict[str, Any]:
    """Overinterpretation of a dataset (paper 004): each image's sufficient input subset
    and the confidence left with 95 % of it masked, computed by TorchServe in batches."""
    return _guarded(_whole, spec)


def run_chunk(spec: dict[str, Any]) -> dict[str, Any]:
    """One chunk of a fanned-out dataset job: the part of its images, for the reduce."""
    return _guarded(_chunk, spec)


def run_reduce(spec: dict[str, Any]) -> dict[str, Any]:
    """The reduce of a fanned-out dataset job (the job its client follows): its result."""
    return _guarded(_reduce, spec)

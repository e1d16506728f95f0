"""``/v1/jobs``: enqueue criticism, filter, apem, audit, evaluate and overinterpretation jobs,
follow them, fetch results, cancel."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Request, status
from starlette.concurrency import run_in_threadpool

from protocol.params.metrics import ApemParams, FilterParams, SisParams
from service.datasets import DatasetStore
from service.errors import ApiError
from service.gateway.deps import ApiKey, Registry, SettingsDep
from service.gateway.forms import check_library_params, check_task
from service.gateway.schemas import (
    ApemJobRequest,
    AuditJobRequest,
    CriticismJobRequest,
    EvaluateJobRequest,
    FilterJobRequest,
    JobAccepted,
    JobRequest,
    JobResult,
    JobStatusResponse,
    OverinterpretationJobRequest,
)
from service.imaging import decode_image
from service.jobs import fanout, tasks  # noqa: F401 - tasks registers how each dataset job splits
from service.jobs import queue as jobq
from service.jobs.audit import MAX_OVERLAYS
from service.jobs.criticism import check_params
from service.jobs.evaluation import read_votes
from service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
UNKNOWN = {404: {"description": "unknown job"}, 410: {"description": "job expired (TTL)"}}


async def _check(body: JobRequest, registry: Registry, settings: SettingsDep) -> dict[str, Any]:
    described = await registry.get(body.model)
    spec = body.model_dump()
    if isinstance(body, CriticismJobRequest):
        needs = {"adversarial": "robustness", "mmd": "embed", "probs": "embed"}
        if body.method in needs:
            check_task(described, needs[body.method])
        _check_dataset(body.dataset_id, body.class_name, settings)
        problem = check_params(body.method, body.params, body.m)
        if problem:
            raise ApiError(422, "invalid_params", problem)
        return spec
    if isinstance(body, EvaluateJobRequest):
        check_task(described, "embed")
        _check_labels(_check_dataset(body.dataset_id, body.class_name, settings), described, "measuring the error")
        manifest = DatasetStore(settings).get(body.dataset_id) or {}
        try:
            read_votes(manifest.get("metadata"))
        except ValueError as exc:
            raise ApiError(422, "invalid_metadata", str(exc)) from None
        return spec
    if isinstance(body, OverinterpretationJobRequest):
        check_task(described, "sufficient_subsets")
        check_library_params(SisParams, body.params, "params")
        _check_labels(_check_dataset(body.dataset_id, body.class_name, settings), described, "overinterpretation")
        return spec
    if isinstance(body, AuditJobRequest):
        check_task(described, "noise_sensitivity")
        if body.groups and body.class_name is None:
            raise ApiError(422, "invalid_params", "groups name features of one class: give class_name")
        classes = _check_dataset(body.dataset_id, body.class_name, settings)
        _check_labels(classes, described, "the audit")
        overlays = len(classes) * body.top_k * body.gallery_images
        if overlays > MAX_OVERLAYS:
            raise ApiError(
                422,
                "invalid_params",
                f"an audit of {len(classes)} classes with top_k {body.top_k} and gallery_images "
                f"{body.gallery_images} would return {overlays} overlays (at most {MAX_OVERLAYS}): "
                "give class_name, or lower gallery_images or top_k",
            )
        return spec
    check_task(described, "apem_set" if isinstance(body, ApemJobRequest) else "filter")
    if described.explainers and body.method not in described.explainers:
        raise ApiError(422, "unknown_method", f"unknown explanation method {body.method!r}")
    check_library_params(ApemParams, body.apem_params, "apem_params")
    if isinstance(body, FilterJobRequest):
        check_library_params(FilterParams, body.filter_params, "filter_params")
    if isinstance(body, ApemJobRequest):
        classes = _check_dataset(body.dataset_id, body.class_name, settings)
        _check_labels(classes, described, "APEM's loss")
        return spec
    if body.target is not None and body.target >= int(described.spec["num_classes"]):
        raise ApiError(422, "invalid_target", "target out of range")
    try:
        raw = base64.b64decode(body.image, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_image", "`image` is not valid base64") from None
    canonical = await run_in_threadpool(decode_image, raw, settings.max_image_pixels)
    spec["image"] = base64.b64encode(canonical.png).decode()
    return spec


def _check_labels(classes: list[str], described: Any, needs: str) -> None:
    """422 unless every class in scope is one of the model's labels."""
    unknown = sorted(set(classes) - set(described.spec.get("labels", [])))
    if unknown:
        raise ApiError(
            422,
            "unknown_class",
            f"{needs} needs each image's label among the model's; not labels: "
            + ", ".join(map(repr, unknown[:20])),
        )


def _check_dataset(dataset_id: str, class_name: str | None, settings: Settings) -> list[str]:
    """The dataset's classes in scope (``class_name``, or all); 404 / 422 when missing."""
    manifest = DatasetStore(settings).get(dataset_id)
    if manifest is None:
        raise ApiError(404, "dataset_not_found", "unknown dataset")
    if class_name is None:
        return list(manifest["classes"])
    if class_name not in manifest["classes"]:
        raise ApiError(422, "unknown_class", f"the dataset has no class {class_name!r}")
    return [class_name]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={
        404: {"description": "unknown model or dataset"},
        422: {"description": "invalid job"},
    },
)
async def create_job(
    _: ApiKey, body: JobRequest, request: Request, registry: Registry, settings: SettingsDep
) -> JobAccepted:
    spec = await _check(body, registry, settings)
    queue = jobq.get_queue(request.app.state.redis, settings)
    job = await run_in_threadpool(fanout.submit, queue, settings, body.type, spec)
    return JobAccepted(
        job_id=job.id, status_url=str(request.url_for("get_job", job_id=job.id).path)
    )


@router.get("/{job_id}", response_model=JobStatusResponse, responses=UNKNOWN)
def get_job(_: ApiKey, job_id: str, request: Request, settings: SettingsDep) -> JobStatusResponse:
    job = jobq.fetch(request.app.state.redis, settings, job_id)
    return JobStatusResponse(**jobq.view(job).__dict__)


@router.get(
    "/{job_id}/result",
    response_model=JobResult,
    responses={**UNKNOWN, 409: {"description": "not finished"}},
)
def get_job_result(_: ApiKey, job_id: str, request: Request, settings: SettingsDep) -> Any:
    job = jobq.fetch(request.app.state.redis, settings, job_id)
    state = jobq.view(job)
    if state.status != "finished":
        message = f"the job is {state.status}"
        if state.error:
            message += f": {state.error}"
        raise ApiError(409, "job_not_finished", message)
    result = job.return_value(refresh=True)
    if result is None:
        raise ApiError(410, "job_expired", "the job's result has expired")
    return result


@router.delete(
    "/{job_id}",
    response_model=JobStatusResponse,
    responses={**UNKNOWN, 409: {"description": "already ended"}},
)
def cancel_job(
    _: ApiKey, job_id: str, request: Request, settings: SettingsDep
) -> JobStatusResponse:
    redis = request.app.state.redis
    job = jobq.fetch(redis, settings, job_id)
    if job.get_status(refresh=True) in jobq.ENDED:
        raise ApiError(409, "job_ended", f"the job has already ended ({jobq.view(job).status})")
    jobq.cancel(redis, job)
    return JobStatusResponse(**jobq.view(job).__dict__)

"""``/v1/jobs``: enqueue a job of any registered type (:mod:`service.jobs.types`: criticism,
filter, apem, audit, evaluate, overinterpretation), follow it, fetch its result, cancel it.

A body is validated by its type's request model, then checked by its type's ``check`` (the
model's tasks and labels, the dataset, the parameters) before anything is queued."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError
from service.gateway.deps import ApiKey, Registry, SettingsDep
from service.gateway.schemas import JobAccepted, JobStatusResponse
from service.jobs import fanout
from service.jobs import queue as jobq
from service.jobs.types import JOB_TYPES, JobRequest, JobResult

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
UNKNOWN = {404: {"description": "unknown job"}, 410: {"description": "job expired (TTL)"}}


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
    job_type = JOB_TYPES[body.type]
    spec = await job_type.check(body, await registry.get(body.model), settings)
    queue = jobq.get_queue(request.app.state.redis, settings)
    job = await run_in_threadpool(fanout.submit, queue, settings, job_type, spec)
    return JobAccepted(
        job_id=job.id, status_url=str(request.url_for("get_job", job_id=job.id).path)
    )


@router.get("/{job_id}", response_model=JobStatusResponse, responses=UNKNOWN)
def get_job(_: ApiKey, job_id: str, request: Request, settings: SettingsDep) -> JobStatusResponse:
    job = jobq.fetch(request.app.state.redis, settings, job_id)
    return jobq.view(job)


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
    return jobq.view(job)

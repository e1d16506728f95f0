"""Enqueueing jobs, reading their state and cancelling them (used by the gateway; JSON
serializer only).

Every job carries ``meta = {"type", "progress", "error"}``, the configured result and
failure TTLs, a timeout and an RQ ``Retry``. A marker key outlives the job by
``expired_marker_ttl_s`` so that a job whose result TTL has passed answers 410, not 404.
A job that fanned out (:mod:`service.jobs.fanout`) is its reduce job, whose
``meta["chunks"]`` lists its chunk jobs (``id``, ``start``, ``stop``): until the reduce
runs, its status and progress are its chunks', and cancelling it cancels them.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.command import send_stop_job_command
from rq.exceptions import NoSuchJobError
from rq.job import Dependency, Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from service.errors import ApiError
from service.gateway.schemas import JobStatusResponse
from service.settings import Settings

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MARKER = "beyond:job:{}"
_STATES = {
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.CREATED: "queued",
    JobStatus.STARTED: "started",
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled",
    JobStatus.CANCELED: "canceled",
}
ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
NOT_BEGUN = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.CREATED)


def get_queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)


def enqueue(
    queue: Queue,
    settings: Settings,
    job_type: str,
    spec: dict[str, Any],
    *,
    function: str,
    timeout_s: int | None = None,
    retries: int | None = None,
    depends_on: Dependency | None = None,
    meta: dict[str, Any] | None = None,
) -> Job:
    """Enqueue ``function`` (the dotted name of an RQ function) with ``spec`` as its one
    argument, after the jobs of ``depends_on``; ``meta`` adds to the job's meta, whose
    ``type`` is ``job_type``."""
    retries = settings.job_retries if retries is None else retries
    retry = (
        Retry(max=retries, interval=settings.job_retry_intervals_s or 0) if retries > 0 else None
    )
    job = queue.enqueue(
        function,
        kwargs={"spec": spec},
        job_timeout=timeout_s or settings.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.failure_ttl_s,
        retry=retry,
        depends_on=depends_on,
        meta={
            "type": job_type,
            "progress": 0.0,
            "error": None,
            "timeout_s": timeout_s or settings.job_timeout_s,
            **(meta or {}),
        },
        description=f"{job_type} job",
        job_id=uuid.uuid4().hex,
    )
    queue.connection.set(MARKER.format(job.id), job_type, ex=settings.expired_marker_ttl_s)
    return job


def fetch(redis: Redis, settings: Settings, job_id: str) -> Job:
    """The job, or 404 (unknown) / 410 (its TTL has passed)."""
    if not JOB_ID.match(job_id):
        raise ApiError(404, "job_not_found", "unknown job")
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        if job.origin != settings.queue_name or "type" not in job.meta:
            raise NoSuchJobError(job_id)
        return job
    except NoSuchJobError:
        if redis.exists(MARKER.format(job_id)):
            raise ApiError(
                410,
                "job_expired",
                "the job's result and status have expired (see BEYOND_RESULT_TTL_S)",
            ) from None
        raise ApiError(404, "job_not_found", "unknown job") from None


def failure_reason(job: Job) -> str | None:
    """A short, trace-free reason why the job failed or was canceled."""
    meta_error = job.meta.get("error")
    result = job.latest_result()
    exc = (result.exc_string or "") if result is not None else ""
    if "JobTimeoutException" in exc:
        return f"timeout: the job exceeded its limit of {job.meta.get('timeout_s', job.timeout)} s"
    if "AbandonedJobError" in exc:
        return "the worker running the job died (abandoned job); retries exhausted"
    if "Work-horse terminated unexpectedly" in exc:
        return "the worker process running the job was killed; retries exhausted"
    if meta_error:
        return str(meta_error)
    if "stopped" in exc.lower():
        return "canceled"
    if exc:
        return "the job failed; see the worker log"
    return None


def chunks_of(job: Job) -> list[Job | None]:
    """The chunk jobs of a job that fanned out, in order (None for one that has expired);
    none for a job that runs whole."""
    listed = job.meta.get("chunks") or []
    return Job.fetch_many([c["id"] for c in listed], connection=job.connection, serializer=JSONSerializer)


def _chunked(job: Job) -> tuple[float, bool]:
    """A fanned-out job's progress, its chunks' weighted by their image counts, and whether
    any chunk has begun (run, or ended)."""
    done, total, begun = 0.0, 0, False
    for entry, chunk in zip(job.meta["chunks"], chunks_of(job), strict=True):
        size = entry["stop"] - entry["start"]
        total += size
        if chunk is None:
            continue
        state = chunk.get_status(refresh=False)
        begun = begun or state not in NOT_BEGUN
        done += size * (1.0 if state == JobStatus.FINISHED else float(chunk.meta.get("progress") or 0.0))
    return done / max(1, total), begun


def view(job: Job) -> JobStatusResponse:
    """The job as ``GET /v1/jobs/{id}`` shows it (a fanned-out job's state is its chunks')."""
    status = _STATES.get(job.get_status(refresh=True), "queued")
    job.get_meta(refresh=True)
    progress = float(job.meta.get("progress") or 0.0)
    if job.meta.get("chunks") and status != "finished":
        progress, begun = _chunked(job)
        status = "started" if status == "queued" and begun else status
    progress = 1.0 if status == "finished" else progress
    error = failure_reason(job) if status in ("failed", "canceled") else None
    return JobStatusResponse(
        job_id=job.id,
        type=str(job.meta.get("type", "")),
        status=status,
        progress=max(0.0, min(1.0, progress)),
        error=error,
        created_at=job.created_at,
        ended_at=job.ended_at if status in ("finished", "failed", "canceled") else None,
    )


def cancel(redis: Redis, job: Job) -> None:
    """Stop ``job`` where it runs, else cancel it; then each chunk of a fanned-out job the
    same way (its reduce first, so that a chunk ending meanwhile cannot start it)."""
    for each in [job, *(chunk for chunk in chunks_of(job) if chunk is not None)]:
        state = each.get_status(refresh=True)
        if state in ENDED:
            continue
        if state == JobStatus.STARTED:
            try:
                send_stop_job_command(redis, each.id, serializer=JSONSerializer)
                continue
            except Exception:  # not running after all (it ended, or its worker is gone)
                pass
        each.cancel()


def expire_chunks(redis: Redis, chunks: list[Job], ttl_s: int) -> None:
    """Let a reduce's chunk jobs and their parts (the bulk of a job's data in Redis) expire
    after ``ttl_s`` instead of the result TTL."""
    with redis.pipeline() as pipeline:
        for chunk in chunks:
            chunk.cleanup(ttl_s, pipeline=pipeline)
            pipeline.expire(Result.get_key(chunk.id), ttl_s)
        pipeline.execute()

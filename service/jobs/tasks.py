"""The RQ functions (module-level, one JSON ``spec`` argument each) that run every job type.

:func:`run_job` runs a job whole: its type's :meth:`~service.jobs.registry.JobType.run`, the
type found by the spec's ``type`` among :mod:`service.jobs.types`. A dataset job fanned out
(:mod:`service.jobs.fanout`) runs as :func:`run_chunk` jobs, each mapping its slice of the
images, and one :func:`run_reduce` that makes the result from their parts.

Progress goes to ``job.meta["progress"]``; a failure that retrying cannot fix raises
:class:`~service.jobs.common.JobFailure` (not retried, its reason shown to clients), and so
does any refusal from the model server but a transient one (503 / 504: RQ retries those).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rq import get_current_job
from rq.job import JobStatus

from service.errors import ApiError
from service.jobs import queue as jobq
from service.jobs.common import JobFailure, fail, set_progress
from service.jobs.fanout import DatasetJob, decode_part, encode_part
from service.jobs.registry import JobType, Spec
from service.jobs.types import JOB_TYPES
from service.settings import get_settings

CHUNKS_KEPT_S = 3600
"""How long a fanned-out job's chunks (and their parts) stay in Redis once its reduce has
run: time for a retried reduce, not the result TTL's days."""
Body = Callable[[Spec], dict[str, Any]]


def _guarded(body: Body, spec: Spec) -> dict[str, Any]:
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
        raise fail(f"{exc.code}: {exc.message}") from None


def _job_type(spec: Spec) -> JobType[Any]:
    """The spec's job type; a job failure for a type this worker does not know (queued by
    a newer gateway)."""
    job_type = JOB_TYPES.get(spec["type"])
    if job_type is None:
        raise fail(f"unknown job type {spec['type']!r}: the worker is older than the gateway")
    return job_type


def _dataset_job(spec: Spec) -> DatasetJob[Any]:
    job_type = _job_type(spec)
    assert isinstance(job_type, DatasetJob), "only a dataset job fans out (fanout.submit)"
    return job_type


def _whole(spec: Spec) -> dict[str, Any]:
    return _job_type(spec).run(spec, get_settings())


def _chunk(spec: Spec) -> dict[str, Any]:
    """One chunk of a fanned-out job: the part of its slice ``spec["chunk"]``, as JSON."""
    start, stop = spec["chunk"]
    job_type = _dataset_job(spec)
    with job_type.opened(spec, get_settings(), time.time()) as run:
        part = job_type.map(run, run.images[start:stop])
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
                raise fail(f"{reason} (the chunk of images {entry['start']}-{entry['stop']})")
        finished = [chunk for chunk in chunks if chunk is not None]
        started = min(chunk.started_at.timestamp() for chunk in finished if chunk.started_at)
        job_type = _dataset_job(spec)
        with job_type.opened(spec, get_settings(), started) as run:
            if listed[-1]["stop"] != len(run.images):  # the gateway planned with other code
                raise fail("the job's image list changed after it was split; submit it again")
            return job_type.reduce(run, [decode_part(chunk.return_value()) for chunk in finished])
    finally:
        jobq.expire_chunks(job.connection, [chunk for chunk in chunks if chunk is not None], CHUNKS_KEPT_S)


def run_job(spec: Spec) -> dict[str, Any]:
    """A job in one RQ job (``fanout.JOB_FUNCTION``): its result."""
    return _guarded(_whole, spec)


def run_chunk(spec: Spec) -> dict[str, Any]:
    """One chunk of a fanned-out dataset job: the part of its images, for the reduce."""
    return _guarded(_chunk, spec)


def run_reduce(spec: Spec) -> dict[str, Any]:
    """The reduce of a fanned-out dataset job (the job its client follows): its result."""
    return _guarded(_reduce, spec)


def __getattr__(name: str) -> Body:
    """``run_<type>``, the RQ function of each job type before they all ran through
    :func:`run_job` (the type is in the spec): so that jobs queued by an older gateway, or
    still queued from before an upgrade, run on this worker."""
    if name.startswith("run_") and name.removeprefix("run_") in JOB_TYPES:
        return run_job
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

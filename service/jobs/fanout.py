"""Fan-out: a large dataset job runs as chunk jobs that any workers take, then one reduce.

A dataset job (criticism, apem, audit, evaluate, overinterpretation) works through a list of
images that is a pure function of its spec and the dataset's manifest: the images in scope,
or their seeded sample, in the order its TorchServe calls send them. Each such job type is
a :class:`DatasetJob`, whose :class:`Split` says how that list is made, where it may be cut,
what a slice of it gives (``map``: the TorchServe answers for those images) and how the
parts become the result (``reduce``: everything that needs all the images at once, such as
MMD-critic's selection over every embedding, a mean, a median or a gallery).

:func:`submit` enqueues a job of more than ``BEYOND_CHUNK_IMAGES`` images as chunks of about
that many, cut only between TorchServe calls (so every chunk sends the very calls the whole
job would), one RQ job each on the job's queue: any worker takes any chunk, and each has
the configured ``Retry``, so a chunk whose worker dies is retried alone. One reduce job
depends on all of them with ``allow_failure``: it runs once every chunk has ended, and fails
the job with a failed chunk's reason instead of waiting forever. The reduce is the job the
client holds; :mod:`service.jobs.queue` reads its status and progress from its chunks until it
runs, and cancels them with it. A smaller job is one RQ job that maps its whole list and
reduces that one part (:meth:`DatasetJob.run`): the same code, one chunk. Parts travel as
JSON, arrays as their ``.npy`` bytes, so a fanned-out job's result is the whole job's, float
for float. The three RQ functions are :mod:`service.jobs.tasks`'.
"""

from __future__ import annotations

import base64
import io
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any

import numpy as np
from rq import Queue
from rq.job import Dependency, Job

from protocol.contract import DescribeResult, EncodedArray
from service.datasets import DatasetStore
from service.errors import ApiError
from service.jobs import queue as jobq
from service.jobs.common import Image, fail, set_progress
from service.jobs.criticism import decode_array
from service.jobs.registry import JobType, RequestT, Spec
from service.settings import Settings
from service.torchserve_client import SyncTorchServeClient

Part = dict[str, Any]
JOB_FUNCTION = "service.jobs.tasks.run_job"
CHUNK_FUNCTION = "service.jobs.tasks.run_chunk"
REDUCE_FUNCTION = "service.jobs.tasks.run_reduce"
MAX_CHUNKS = 64
"""Most chunks of one job, whatever ``BEYOND_CHUNK_IMAGES`` says: each chunk reads the
dataset's manifest and asks TorchServe for the model's description once, so thousands of
tiny chunks would cost more than they spread."""


@dataclass(frozen=True)
class Run:
    """What a job's ``map`` (in each chunk) and ``reduce`` work with."""

    spec: Spec
    settings: Settings
    store: DatasetStore
    manifest: dict[str, Any]
    client: SyncTorchServeClient
    described: DescribeResult
    images: list[Image]
    """the whole job's list (:meth:`Split.images`); a ``map`` gets its slice beside it"""
    started: float
    """when the job's work began (epoch seconds; a fanned-out job's first chunk start)"""
    progress: Callable[[float], None]
    """the share of this RQ job done (a chunk's, or the whole job's)"""


class Split(ABC):
    """How one dataset job type runs in chunks: its image list, where the list may be cut,
    what a slice gives and how the parts make the result."""

    @abstractmethod
    def images(self, spec: Spec, manifest: dict[str, Any], settings: Settings) -> list[Image]:
        """The job's images in the order its calls send them: a pure function of its
        arguments, so that the gateway's plan, every chunk and the reduce agree on it."""

    @abstractmethod
    def units(self, spec: Spec, images: list[Image], settings: Settings) -> list[int]:
        """Sizes of the consecutive runs of ``images`` that one chunk must keep together
        (one TorchServe call each, usually: see :func:`calls`)."""

    @abstractmethod
    def map(self, run: Run, images: list[Image]) -> Part:
        """What ``images`` (a slice of ``run.images``, whole units) contribute: JSON values
        and numpy arrays."""

    @abstractmethod
    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        """The job's result from the parts of consecutive slices covering ``run.images``."""


class DatasetJob(JobType[RequestT], Split):
    """A job type over a dataset's images: a :class:`Split` that runs whole in one RQ job,
    or in chunks and a reduce when :func:`submit` fans it out."""

    @contextmanager
    def opened(self, spec: Spec, settings: Settings, started: float) -> Iterator[Run]:
        """What this job's map and reduce work with; a job failure when the dataset is gone
        or has no image in scope."""
        set_progress(0.0)
        store = DatasetStore(settings)
        manifest = store.get(spec["dataset_id"])
        if manifest is None:
            raise fail("dataset not found (deleted?)")
        images = self.images(spec, manifest, settings)
        if not images:
            raise fail(f"the dataset has no image of class {spec.get('class_name')!r}")
        with SyncTorchServeClient(settings) as client:
            described = client.describe(spec["model"])
            yield Run(spec, settings, store, manifest, client, described, images, started, set_progress)

    def run(self, spec: Spec, settings: Settings) -> dict[str, Any]:
        """The job in one RQ job: its whole image list mapped, that one part reduced."""
        with self.opened(spec, settings, time.time()) as run:
            part = self.map(run, run.images)
            set_progress(1.0)
            return self.reduce(run, [part])


def calls(n: int, size: int) -> list[int]:
    """The sizes of the calls of ``size`` images that ``n`` images take (the last smaller)."""
    return [min(size, n - start) for start in range(0, n, size)]


def plan(units: list[int], most: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``ceil(images / most)`` chunks (at most :data:`MAX_CHUNKS`, and
    no more than units), each cut at the end of the unit nearest to an equal share; one chunk
    of everything when ``most`` is 0 or the units hold no more than ``most`` images."""
    total = sum(units)
    if most <= 0 or total <= most:
        return [(0, total)]
    ends = list(accumulate(units))[:-1]
    count = min(math.ceil(total / most), MAX_CHUNKS, len(units))
    bounds = [0]
    for k in range(1, count):
        later = [end for end in ends if end > bounds[-1]]
        if not later:
            break
        bounds.append(min(later, key=lambda end: abs(end - total * k / count)))
    return list(pairwise([*bounds, total]))


def submit(queue: Queue, settings: Settings, job_type: JobType[Any], spec: Spec) -> Job:
    """Enqueue a job of ``job_type``: a dataset job of more than ``settings.chunk_images``
    images as its chunks and their reduce, any other whole. Returns the job clients follow."""
    name = job_type.name
    if not isinstance(job_type, DatasetJob) or settings.chunk_images == 0:
        return jobq.enqueue(queue, settings, name, spec, function=JOB_FUNCTION)
    manifest = DatasetStore(settings).get(spec["dataset_id"])
    if manifest is None:
        raise ApiError(404, "dataset_not_found", "unknown dataset")
    images = job_type.images(spec, manifest, settings)
    chunks = plan(job_type.units(spec, images, settings), settings.chunk_images)
    if len(chunks) == 1:
        return jobq.enqueue(queue, settings, name, spec, function=JOB_FUNCTION)
    jobs = [
        jobq.enqueue(queue, settings, f"{name}-chunk", {**spec, "chunk": [start, stop]}, function=CHUNK_FUNCTION)
        for start, stop in chunks
    ]
    listed = [{"id": job.id, "start": start, "stop": stop} for job, (start, stop) in zip(jobs, chunks, strict=True)]
    return jobq.enqueue(
        queue, settings, name, spec, function=REDUCE_FUNCTION,
        depends_on=Dependency(jobs=jobs, allow_failure=True), meta={"chunks": listed},
    )


def encode_part(part: Part) -> dict[str, Any]:
    """A part as JSON for RQ's result: its numpy arrays as base64 ``.npy`` (dtype, shape and
    every bit kept; ``protocol.arrays`` would make them float32), the rest as it is."""
    arrays = {key: value for key, value in part.items() if isinstance(value, np.ndarray)}
    return {
        "values": {key: value for key, value in part.items() if key not in arrays},
        "arrays": {key: _npy(value).model_dump() for key, value in arrays.items()},
    }


def decode_part(stored: dict[str, Any]) -> Part:
    """The part :func:`encode_part` stored."""
    arrays = {key: decode_array(EncodedArray.model_validate(value)) for key, value in stored["arrays"].items()}
    return {**stored["values"], **arrays}


def _npy(array: np.ndarray) -> EncodedArray:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return EncodedArray(data=base64.b64encode(buffer.getvalue()).decode("ascii"), shape=list(array.shape), dtype=str(array.dtype))

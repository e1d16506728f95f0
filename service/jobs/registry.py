"""Job types: the name -> :class:`JobType` registry that :func:`register` fills, and the
HTTP unions built from it.

A job type is one module of :mod:`service.jobs.types` declaring all there is to it: its
request model (whose ``type`` literal is its name), its result model, the check the gateway
runs when a job arrives, and how a worker runs it. The gateway's ``POST /v1/jobs`` body and
``/v1/jobs/{id}/result`` response are the discriminated unions of the registered models
(:func:`request_union`, :func:`result_union`), a job's check is its type's, and workers run
every job through the three RQ functions of :mod:`service.jobs.tasks`, which find the type
by the spec's ``type``. The package imports every module it holds, so adding a job type
edits no list.
"""

from __future__ import annotations

import functools
import operator
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Annotated, Any, Generic, TypeVar, get_args

from pydantic import BaseModel, Field

from protocol.contract import DescribeResult
from service.settings import Settings

Spec = dict[str, Any]
"""A job as RQ carries it: its request's JSON, as its type's check returned it."""
RequestT = TypeVar("RequestT", bound=BaseModel)


class JobType(ABC, Generic[RequestT]):
    """One kind of job: what a client sends and gets back, what the gateway refuses before
    queueing, and what a worker computes. A subclass sets :attr:`request` and :attr:`result`
    and implements :meth:`check` and :meth:`run` (a dataset job gets ``run`` from
    :class:`~service.jobs.fanout.DatasetJob`); :func:`register` names and records it."""

    name: str
    """the ``type`` of its requests, specs and results (its request model's literal)"""
    request: type[RequestT]
    """the ``POST /v1/jobs`` body of this type"""
    result: type[BaseModel]
    """what ``GET /v1/jobs/{id}/result`` answers for this type"""

    @abstractmethod
    async def check(self, body: RequestT, described: DescribeResult, settings: Settings) -> Spec:
        """The spec to queue for ``body``: its JSON, canonicalised where the job needs it.

        Raises an :class:`~service.errors.ApiError` (404 / 422) for what no worker could fix
        (an unknown dataset or class, a task the model does not serve, bad parameters), so
        the client hears it at once instead of from a failed job. ``described`` is the
        model's ``describe`` answer.
        """

    @abstractmethod
    def run(self, spec: Spec, settings: Settings) -> dict[str, Any]:
        """The job's result (JSON that :attr:`result` reads), computed in one RQ job.

        Idempotent: it reads its inputs, computes and returns; every random choice is seeded
        from the spec, so a retried job gives the same result and leaves nothing behind.
        """


JOB_TYPES: dict[str, JobType[Any]] = {}
"""Every registered job type by name, in the order registered (the unions' order)."""
T = TypeVar("T", bound=type[JobType[Any]])


def register(cls: T) -> T:
    """Class decorator: record an instance of ``cls`` under its request's ``type``.

    A request or result model without one ``type`` literal, a result of another type, a
    name taken or an abstract method left out fails at import, not on a client's request.
    """
    name = type_literal(cls.request)
    if type_literal(cls.result) != name:
        raise TypeError(f"{cls.__name__}: its result's type is not {name!r}")
    if name in JOB_TYPES:
        raise ValueError(f"job type {name!r} is registered twice")
    cls.name = name
    JOB_TYPES[name] = cls()
    return cls


def type_literal(model: type[BaseModel]) -> str:
    """The one string of ``model``'s ``type: Literal[...]`` field."""
    field = model.model_fields.get("type")
    values = get_args(field.annotation) if field is not None else ()
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{model.__name__} needs a field `type: Literal[<job type>]`")
    return values[0]


def request_union(types: Iterable[JobType[Any]]) -> Any:
    """The request models of ``types`` as one body, told apart by ``type``."""
    return _union([job.request for job in types])


def result_union(types: Iterable[JobType[Any]]) -> Any:
    """The result models of ``types`` as one response, told apart by ``type``."""
    return _union([job.result for job in types])


def _union(models: list[type[BaseModel]]) -> Any:
    return Annotated[functools.reduce(operator.or_, models), Field(discriminator="type")]

"""The job-type registry: every registered type is whole (request and result in the HTTP
unions and the OpenAPI document, a check, a worker's way to run it), and a type registered
here, in a test, joins the unions, the queue and the workers without any other file."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any, Literal, get_args

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, TypeAdapter, ValidationError
from redis import Redis
from rq.utils import import_attribute

from protocol.contract import DescribeResult
from service.errors import ApiError
from service.gateway.app import create_app
from service.gateway.schemas import RequestModel, ResponseModel
from service.jobs import fanout, tasks
from service.jobs import queue as jobq
from service.jobs.registry import JobType, Spec, register, request_union, result_union, type_literal
from service.jobs.types import JOB_TYPES, MODULES, JobRequest, JobResult
from service.jobs.worker import build_worker
from service.settings import Settings


def members(union: Any) -> set[type[BaseModel]]:
    """The models of an ``Annotated[A | B | ..., Field(discriminator=...)]``."""
    return set(get_args(get_args(union)[0]))


def test_every_registered_job_type_is_whole(settings: Settings) -> None:
    openapi = create_app(settings).openapi()
    schemas = openapi["components"]["schemas"]
    body = openapi["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert list(JOB_TYPES) == list(MODULES)  # one module per type, named after it
    assert set(body["discriminator"]["mapping"]) == set(JOB_TYPES)
    for name, job_type in JOB_TYPES.items():
        assert type(job_type).__module__ == f"service.jobs.types.{name}"
        assert job_type.name == type_literal(job_type.request) == type_literal(job_type.result) == name
        assert job_type.request in members(JobRequest) and job_type.result in members(JobResult)
        assert job_type.request.__name__ in schemas and job_type.result.__name__ in schemas
        assert inspect.iscoroutinefunction(job_type.check) and not inspect.isabstract(type(job_type))
        # what RQ resolves: the function every type runs through, and its name before the registry
        assert import_attribute(fanout.JOB_FUNCTION) is tasks.run_job
        assert import_attribute(f"service.jobs.tasks.run_{name}") is tasks.run_job
        if isinstance(job_type, fanout.DatasetJob):
            assert import_attribute(fanout.CHUNK_FUNCTION) is tasks.run_chunk
            assert import_attribute(fanout.REDUCE_FUNCTION) is tasks.run_reduce
    with pytest.raises(AttributeError):
        tasks.run_nothing  # noqa: B018 - only registered types resolve


class EchoJobRequest(RequestModel):
    type: Literal["echo"]
    model: str
    text: str


class EchoJobResult(ResponseModel):
    type: Literal["echo"] = "echo"
    echoed: str
    queue: str


@pytest.fixture
def echo() -> Iterator[JobType[Any]]:
    """An ``echo`` job type, registered for one test: its check refuses ``"no"``, its run
    echoes the text with the worker's queue."""
    saved = dict(JOB_TYPES)

    @register
    class Echo(JobType[EchoJobRequest]):
        request = EchoJobRequest
        result = EchoJobResult

        async def check(self, body: EchoJobRequest, described: DescribeResult, settings: Settings) -> Spec:
            if body.text == "no":
                raise ApiError(422, "invalid_params", "the echo refuses 'no'")
            return body.model_dump()

        def run(self, spec: Spec, settings: Settings) -> dict[str, Any]:
            return {"type": "echo", "echoed": spec["text"], "queue": settings.queue_name}

    yield JOB_TYPES["echo"]
    JOB_TYPES.clear()
    JOB_TYPES.update(saved)


def test_a_job_type_registered_in_a_test_joins_the_unions_the_queue_and_the_workers(
    echo: JobType[Any], client: TestClient, settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests, results = (TypeAdapter(build(JOB_TYPES.values())) for build in (request_union, result_union))
    body = requests.validate_python({"type": "echo", "model": "shapes-resnet", "text": "hi"})
    assert isinstance(body, EchoJobRequest)
    with pytest.raises(ValidationError):
        requests.validate_python({"type": "echo", "model": "shapes-resnet", "text": "hi", "extra": 1})
    described = DescribeResult(spec={}, tasks=[], explainers=[], attacks=[])
    with pytest.raises(ApiError):
        asyncio.run(JOB_TYPES[body.type].check(body.model_copy(update={"text": "no"}), described, settings))
    spec = asyncio.run(JOB_TYPES[body.type].check(body, described, settings))

    job = fanout.submit(jobq.get_queue(redis, settings), settings, echo, spec)  # what POST /v1/jobs does
    monkeypatch.setattr("service.jobs.tasks.get_settings", lambda: settings)
    build_worker(settings, redis).work(burst=True)

    status = client.get(f"/v1/jobs/{job.id}").json()
    assert status["type"] == "echo" and status["status"] == "finished", status
    result = results.validate_python(job.return_value(refresh=True))
    assert result == EchoJobResult(echoed="hi", queue=settings.queue_name)
    assert import_attribute("service.jobs.tasks.run_echo") is tasks.run_job


class BrokenRequest(RequestModel):
    type: Literal["broken"]


class OtherResult(ResponseModel):
    type: Literal["other"] = "other"


class UntypedResult(ResponseModel):
    value: int


@pytest.mark.parametrize(
    ("result_model", "message"),
    [(OtherResult, "its result's type is not 'broken'"), (UntypedResult, "needs a field `type: Literal")],
)
def test_a_job_type_whose_models_disagree_is_refused_at_import(result_model: type[BaseModel], message: str) -> None:
    class Broken(JobType[BrokenRequest]):
        request = BrokenRequest
        result = result_model

        async def check(self, body: BrokenRequest, described: DescribeResult, settings: Settings) -> Spec:
            return body.model_dump()

        def run(self, spec: Spec, settings: Settings) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match=message):
        register(Broken)
    assert "broken" not in JOB_TYPES


def test_a_taken_name_or_a_missing_method_is_refused_at_import() -> None:
    taken = type(JOB_TYPES["apem"])
    with pytest.raises(ValueError, match="registered twice"):
        register(taken)

    class Unrunnable(JobType[EchoJobRequest]):
        request = EchoJobRequest
        result = EchoJobResult

        async def check(self, body: EchoJobRequest, described: DescribeResult, settings: Settings) -> Spec:
            return body.model_dump()

    with pytest.raises(TypeError, match="abstract"):
        register(Unrunnable)
    assert "echo" not in JOB_TYPES

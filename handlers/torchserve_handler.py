"""TorchServe adapter: decodes TorchServe's request list, calls :class:`TaskRunner`, encodes.

One handler serves every task of ``protocol.contract``. TorchServe batches requests
across clients (``batchSize``/``maxBatchDelay`` in the archive's model config): the
requests of a batched task (``predict``: one forward pass) run in one call of its runner;
other tasks run one after another. The model and its derived copies are built once, in
:meth:`BeyondHandler.initialize`. Requests are JSON or binary frames (``protocol.frames``);
every reply is JSON; refused requests get their own 4xx status and an ``ErrorBody`` without
affecting the rest of the batch. A batch runs under :func:`~handlers.deadline.time_limit`, a
little shorter than the model's ``responseTimeout``, so that a request asking for too much
work is answered 422 ``time_limit`` instead of TorchServe killing the worker; a request whose
caller says how long it waits (``X-Beyond-Time-Limit``) stops a little before that.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from handlers.allocator import retain_freed_memory
from handlers.deadline import TimeLimitExceeded, time_limit
from handlers.tasks import TaskError, TaskRunner
from protocol import contract
from protocol.frames import FrameError, decode_frame, is_frame

log = logging.getLogger(__name__)
_REQUEST = TypeAdapter(contract.TaskRequest)

TORCHSERVE_RESPONSE_TIMEOUT_S = 120
"""TorchServe's ``responseTimeout`` where a model config does not set one."""


def work_time_limit(response_timeout_s: float | None) -> float:
    """Seconds a batch may work: ``responseTimeout`` less a tenth (at least 5 s, at most 60 s)
    for decoding, encoding and a model pass already under way when the limit passes."""
    timeout = float(response_timeout_s or TORCHSERVE_RESPONSE_TIMEOUT_S)
    return max(1.0, timeout - min(60.0, max(5.0, timeout / 10)))


def caller_time_limit(context: Any, index: int) -> float | None:
    """Seconds request ``index`` may work for its caller: its ``X-Beyond-Time-Limit`` less a
    twentieth (at least 2 s); ``None`` without a readable header. The caller's wait also
    covers TorchServe's queue, which the handler does not see, so this is an upper bound."""
    try:
        headers = context.get_all_request_header(index) or {}
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    wanted = contract.TIME_LIMIT_HEADER.lower()
    value = next((v for k, v in headers.items() if str(k).lower() == wanted), None)
    try:
        seconds = float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return max(0.5, seconds - max(2.0, seconds / 20))


def select_device(gpu_id: int | None) -> torch.device:
    """The GPU TorchServe assigned to this worker, or the CPU.

    TF32 convolutions are turned off on the GPU: explanations are gradients of gradients'
    neighbours, and with TF32 a map drifts by about 1e-2 from the CPU's (measured with
    ``benchmarks/devices.py`` on an H100); we keep the GPU's answers equal to the CPU's.
    """
    if gpu_id is not None and torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def torch_threads(workers: int | None, cores: int | None = None) -> int:
    """Intra-op threads for one worker: ``BEYOND_TORCH_THREADS``, else the cores shared out
    among the model's workers (``minWorkers``), so that N workers never run N x cores
    threads: oversubscribed, torch's thread pools stall each other and throughput collapses
    (docs/performance.md)."""
    threads = os.environ.get("BEYOND_TORCH_THREADS")
    if threads:
        return max(1, int(threads))
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers or 1))


def configure_threads(workers: int | None = None) -> None:
    """Set this worker's torch threads (see :func:`torch_threads`); one inter-op thread."""
    torch.set_num_threads(torch_threads(workers))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process (or parallel work has started)
        pass


def parse_request(item: dict[str, Any]) -> contract.BaseModel:
    """One TorchServe request dict -> a validated contract request (JSON or binary frame)."""
    body = item.get("body", item.get("data"))
    if isinstance(body, bytes | bytearray) and is_frame(body):
        try:
            body = decode_frame(body)
        except FrameError as error:
            raise TaskError(400, "invalid_frame", str(error)) from None
    elif isinstance(body, bytes | bytearray):
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise TaskError(400, "invalid_json", "request body is not JSON") from None
    if not isinstance(body, dict):
        raise TaskError(400, "invalid_json", "request body must be a JSON object")
    try:
        return _REQUEST.validate_python(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TaskError(422, "bad_request", f"{where}: {first['msg']}") from None


_LESS_WORK = (
    "the model's responseTimeout, or the caller's X-Beyond-Time-Limit, less a margin; "
    "ask for less work (fewer samples or steps; APEM: a larger step or fewer max_steps; "
    "Explanation Filter: fewer filter_params.levels), or build the model's archive with a "
    "longer --response-timeout"
)


class BeyondHandler:
    """TorchServe's entry object (see ``handlers/ts_entry.py``)."""

    def __init__(self) -> None:
        self.runner: TaskRunner | None = None
        self.time_limit_s = work_time_limit(None)

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_config = getattr(context, "model_yaml_config", None) or {}
        configure_threads(model_config.get("minWorkers"))
        self.time_limit_s = work_time_limit(model_config.get("responseTimeout"))
        retain_freed_memory()
        device = select_device(properties.get("gpu_id"))
        self.runner = TaskRunner.load(Path(properties["model_dir"]), device)
        spec = self.runner.served.spec
        log.info("loaded %s (%s) on %s, its copies built", spec.name, spec.architecture, device)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        with time_limit(self.time_limit_s):
            return self._handle(data, context)

    def _handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        assert self.runner is not None, "initialize() was not called"
        parsed: list[contract.BaseModel | TaskError] = []
        for item in data:
            try:
                parsed.append(parse_request(item))
            except TaskError as error:
                parsed.append(error)
            except Exception:  # one unparsable request must not fail the rest of the batch
                log.exception("request could not be parsed")
                parsed.append(TaskError(400, "invalid_request", "the request could not be parsed"))
        replies: list[contract.BaseModel | TaskError | None] = [None] * len(data)
        batches: dict[str, list[int]] = {}
        for i, request in enumerate(parsed):
            if not isinstance(request, TaskError) and self.runner.is_batched(request):
                batches.setdefault(request.task, []).append(i)  # type: ignore[attr-defined]
        for at in batches.values():
            batch = self.runner.run_batch([parsed[i] for i in at])  # type: ignore[misc]
            for i, result in zip(at, batch, strict=True):
                replies[i] = result
        for i, request in enumerate(parsed):
            if replies[i] is None and isinstance(request, TaskError):
                replies[i] = request
            elif replies[i] is None:
                with time_limit(caller_time_limit(context, i)):  # within the batch's limit
                    replies[i] = self._run_one(request)
        return [self._encode(context, i, reply) for i, reply in enumerate(replies)]

    def _run_one(self, request: contract.BaseModel) -> contract.BaseModel | TaskError:
        assert self.runner is not None
        try:
            return self.runner.run(request)
        except TaskError as error:
            return error
        except TimeLimitExceeded as error:
            return TaskError(422, "time_limit", f"{error}: {_LESS_WORK}")
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return TaskError(503, "out_of_memory", "the accelerator ran out of memory; retry with fewer samples")
        except Exception:  # never let one request kill the worker
            log.exception("task %s failed", getattr(request, "task", "?"))
            return TaskError(500, "internal_error", "the model server failed to run this task")

    @staticmethod
    def _encode(context: Any, index: int, reply: contract.BaseModel | TaskError | None) -> str:
        context.set_response_header(index, "content-type", "application/json")
        if isinstance(reply, TaskError):
            context.set_response_status(reply.status, reply.code, index)
            return reply.body().model_dump_json()
        assert reply is not None
        return reply.model_dump_json()

"""The handler's side of each contract task: its runner, registered by its own module, and
:class:`TaskRunner`, the dispatcher built from the registry.

A task module defines one function and registers it for the task's request model with
:func:`runs` (one request in, its result out) or :func:`runs_batched` (many requests of the
task in, one result or :class:`~handlers.tasks.common.TaskError` per request out, in order:
for a task that the model server batches across callers, such as ``predict`` in one forward
pass). The task's name is the one its request model declares in ``protocol.contract.TASKS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from pydantic import BaseModel

from handlers.tasks.common import TaskError
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.contract.registry import task_name

Reply = BaseModel | TaskError
Function = TypeVar("Function", bound=Callable[..., Any])


class Runner(NamedTuple):
    """A task's runner: ``function(served, request)``, or with ``batched``
    ``function(served, requests) -> [result or TaskError per request]``."""

    function: Callable[..., Any]
    batched: bool


RUNNERS: dict[str, Runner] = {}
"""Task name -> its runner, in the order the task modules registered them."""


def _register(request: type[BaseModel], batched: bool) -> Callable[[Function], Function]:
    name = task_name(request)
    registered = contract.TASKS.get(name)
    if registered is None or registered.request is not request:
        raise TypeError(f"{request.__name__} is not the request model of a contract task")
    if name in RUNNERS:
        raise ValueError(f"task {name!r} already has a runner")

    def register(function: Function) -> Function:
        RUNNERS[name] = Runner(function, batched)
        return function

    return register


def runs(request: type[BaseModel]) -> Callable[[Function], Function]:
    """Register ``function(served, request) -> result`` as the runner of ``request``'s task."""
    return _register(request, batched=False)


def runs_batched(request: type[BaseModel]) -> Callable[[Function], Function]:
    """Register ``function(served, requests) -> [result or TaskError]`` as the batched
    runner of ``request``'s task."""
    return _register(request, batched=True)


def check_runners() -> None:
    """Raise unless every contract task has a runner: a task without one fails when the
    handler is imported, not on a user's request."""
    missing = [name for name in contract.TASKS if name not in RUNNERS]
    if missing:
        raise ImportError(f"contract tasks without a runner in handlers/tasks: {missing}")


class TaskRunner:
    """Runs contract tasks on one :class:`ServedModel`; knows nothing of HTTP or TorchServe."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> TaskRunner:
        """A runner for the model of a model directory, its copies built (``ServedModel.load``)."""
        return cls(ServedModel.load(directory, device))

    @property
    def device(self) -> torch.device:
        return self.served.device

    @property
    def tasks(self) -> list[str]:
        return list(RUNNERS)

    def _runner(self, request: BaseModel) -> Runner:
        task = getattr(request, "task", None)
        runner = RUNNERS.get(str(task))
        if runner is None:
            raise TaskError(422, "unknown_task", f"task {task!r} is not served; served: {sorted(RUNNERS)}")
        return runner

    def is_batched(self, request: BaseModel) -> bool:
        """Whether ``request``'s task runs many requests at once (:meth:`run_batch`)."""
        return self._runner(request).batched

    def run(self, request: BaseModel) -> BaseModel:
        """Run one task request; a refused request raises :class:`TaskError`."""
        runner = self._runner(request)
        if not runner.batched:
            return runner.function(self.served, request)
        (reply,) = runner.function(self.served, [request])
        if isinstance(reply, TaskError):
            raise reply
        return reply

    def run_batch(self, requests: Sequence[BaseModel]) -> list[Reply]:
        """Run requests of one batched task in one call; a refused request gets its
        :class:`TaskError` in its place, without failing the others."""
        runner = self._runner(requests[0])
        if not runner.batched or any(self._runner(r) is not runner for r in requests):
            raise ValueError("run_batch takes requests of one batched task")
        return runner.function(self.served, requests)

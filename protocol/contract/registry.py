"""The contract's tasks, each declared once: its name, its request model, its result model.

A task module defines a request model whose ``task`` field is a one-value ``Literal`` (the
task's name, and the discriminator on the wire) and a result model, and registers them with
:func:`register_task`. Everything that lists tasks is built from :data:`TASKS`: the
:data:`~protocol.contract.TaskRequest` union both sides parse, the handler's dispatch table
and task list (``handlers.tasks``), and the unit tests' fake model server.
"""

from __future__ import annotations

import functools
import operator
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

from pydantic import BaseModel, Field


class TaskContract(NamedTuple):
    name: str
    request: type[BaseModel]
    result: type[BaseModel]


TASKS: dict[str, TaskContract] = {}
"""Task name -> its contract, in the order the task modules registered them."""


def task_name(request: type[BaseModel]) -> str:
    """The name a request model declares: its ``task`` field, a one-value ``Literal`` default.

    Raises:
        TypeError: ``request`` has no such field, so it cannot join the discriminated union.
    """
    field = request.model_fields.get("task")
    values = get_args(field.annotation) if field is not None else ()
    if field is None or get_origin(field.annotation) is not Literal or len(values) != 1 or field.default != values[0]:
        raise TypeError(f"{request.__name__}.task must be Literal['<name>'] with that name as its default")
    return str(values[0])


def register_task(request: type[BaseModel], result: type[BaseModel]) -> TaskContract:
    """Declare a task: ``request`` (which names it) is answered by ``result``.

    Raises:
        TypeError: ``request`` does not name its task (:func:`task_name`).
        ValueError: Another request model already registered that name.
    """
    name = task_name(request)
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered by {TASKS[name].request.__name__}")
    TASKS[name] = TaskContract(name, request, result)
    return TASKS[name]


def task_union() -> Any:
    """Every registered request model as one union discriminated on ``task``."""
    members = functools.reduce(operator.or_, (contract.request for contract in TASKS.values()))
    return Annotated[members, Field(discriminator="task")]

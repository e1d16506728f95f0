"""Parameter validation shared by the attacks, metrics and criticism methods (torch-free).

Every method takes its parameters as a pydantic model. A request's ``params`` dict is
parsed with :func:`parse_params`; any bad value becomes one :class:`InvalidParameter`
naming the parameter and the reason, which the TorchServe handler maps to HTTP 422.
An unknown method name becomes :class:`UnknownMethod` (also a 422, or 404 if preferred).
A class index outside the model's classes (an explanation's ``target``, an attack's
``target_class``, a label) is checked by :func:`check_class_index` alone, in the gateway and
in the handler alike, and becomes :class:`ClassOutOfRange`: 422 ``invalid_target``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

P = TypeVar("P", bound=BaseModel)


class InvalidParameter(ValueError):
    """A parameter value that a method cannot accept.

    Attributes:
        param: dotted name of the offending parameter (``"epsilon"``, ``"grid.step"``).
        reason: human-readable reason, suitable for an API error message.
    """

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


class ClassOutOfRange(InvalidParameter):
    """A class index outside ``[0, num_classes)``; every layer answers it with :data:`code`."""

    code = "invalid_target"


def check_class_index(param: str, values: int | Iterable[int], num_classes: int) -> None:
    """Raise :class:`ClassOutOfRange` unless every class index of ``values`` lies in
    ``[0, num_classes)``: the one check of a target class, wherever the class count is known
    (the handler: its model; the gateway: the model's ``describe``).

    ``values`` is one index or several (plain integers: a tensor's ``tolist()``, checked on
    the host rather than with comparison kernels and a reduction).
    """
    for value in (values,) if isinstance(values, int) else values:
        if not 0 <= value < num_classes:
            raise ClassOutOfRange(
                param, f"class {value} is out of range for a model with {num_classes} classes"
            )


class UnknownMethod(KeyError):
    """A method name that is not in the registry it was looked up in (a ``KeyError``)."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.kind = kind
        self.name = name
        self.known = sorted(known)

    def __str__(self) -> str:
        return f"unknown {self.kind} {self.name!r}; available: {', '.join(self.known)}"


class StrictParams(BaseModel):
    """Base for parameter models: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_TYPE_TAGS = frozenset({"bool", "int", "float", "str", "list", "dict", "none"})


def _union_branch(part: int | str) -> bool:
    """Whether a pydantic error location part names a union's branch (``literal['mean']``,
    ``float``), not a field: ``mask_value``, not ``mask_value.literal['mean']``."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in _TYPE_TAGS)


def parse_params(model: type[P], params: Mapping[str, Any] | P | None) -> P:
    """Validate ``params`` against ``model``; raise :class:`InvalidParameter` on the first error.

    Args:
        model: the pydantic parameter model of a method.
        params: a dict from a request, an instance of ``model`` (returned as is) or None
            (all defaults).

    Returns:
        The validated parameter object.

    Raises:
        InvalidParameter: naming the first offending parameter.
    """
    if isinstance(params, model):
        return params
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, InvalidParameter):  # raised by a model validator
            raise InvalidParameter(cause.param, cause.reason) from None
        name = ".".join(str(part) for part in first["loc"] if not _union_branch(part)) or "params"
        reasons = [f"{e['msg']} (got {e['input']!r})" if e["loc"] else e["msg"] for e in exc.errors()]
        raise InvalidParameter(name, "; ".join(reasons)) from None

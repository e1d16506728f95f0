"""A time limit for the work of one model-server call, checked by the libraries' long loops.

TorchServe kills a worker whose call outlives the model's ``responseTimeout``: every request
of that batch fails and the model loads again. How long a call runs is in the client's hands
(an APEM grid of 100,000 steps, an Explanation Filter over every distinct value of a 224x224
map, SmoothGrad over IG with 100,000 passes). So the handler runs each call under
:func:`time_limit`, somewhat shorter than ``responseTimeout``, and the loops whose length a
client sets call :func:`check_time` once per model pass: past the limit it raises
:class:`TimeLimitExceeded`, which the handler answers as a 422 saying what to ask for
instead, and the worker goes on serving. Outside :func:`time_limit` nothing is checked (the
libraries used on their own, the tests).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple


class TimeLimitExceeded(RuntimeError):
    """The work of one call ran past its :func:`time_limit`."""


class _Limit(NamedTuple):
    deadline: float  # time.monotonic()
    seconds: float


_LIMIT: ContextVar[_Limit | None] = ContextVar("beyond_time_limit", default=None)


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Limit the work inside the block to ``seconds`` (``None``: no limit of its own; an
    enclosing limit that ends sooner still holds)."""
    outer = _LIMIT.get()
    limit = outer
    if seconds is not None:
        mine = _Limit(time.monotonic() + seconds, seconds)
        limit = mine if outer is None or mine.deadline < outer.deadline else outer
    token = _LIMIT.set(limit)
    try:
        yield
    finally:
        _LIMIT.reset(token)


def check_time(work: str) -> None:
    """Raise :class:`TimeLimitExceeded` naming ``work`` if the current limit has passed."""
    limit = _LIMIT.get()
    if limit is not None and time.monotonic() > limit.deadline:
        raise TimeLimitExceeded(f"{work} did not finish within the {limit.seconds:g} s this call may work")


def time_left() -> float | None:
    """Seconds until the current limit (negative once past it); ``None`` without a limit.
    For work that can stop early with a partial result instead of failing."""
    limit = _LIMIT.get()
    return None if limit is None else limit.deadline - time.monotonic()

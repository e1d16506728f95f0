"""TorchServe calls of a job, several in flight at once (``BEYOND_EMBED_CONCURRENCY``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def in_flight(fetch: Callable[[int], T], keys: Iterable[int], concurrency: int) -> Iterator[tuple[int, T]]:
    """``(key, fetch(key))`` for every key, in order, with at most ``concurrency`` calls
    running at once: on threads (the calls wait on TorchServe), or one after another in
    the caller's thread when ``concurrency`` is 1.

    A call that raises, or an exception in the caller (RQ's job timeout), stops the
    iteration at once: calls not started are cancelled and running ones are not waited for.
    """
    if concurrency <= 1:
        for key in keys:
            yield key, fetch(key)
        return
    pool = ThreadPoolExecutor(max_workers=concurrency)
    pending: deque[tuple[int, Future[T]]] = deque()
    try:
        for key in keys:
            pending.append((key, pool.submit(fetch, key)))
            if len(pending) >= concurrency:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

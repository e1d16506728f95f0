"""TorchServe calls of a job, several in flight at once (``BEYOND_EMBED_CONCURRENCY``)."""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from service.errors import ApiError

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741


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


def in_batches(
    items: Sequence[I],
    size: int,
    fetch: Callable[[Sequence[I]], T],
    concurrency: int = 1,
    progress: Callable[[float], None] | None = None,
) -> list[T]:
    """``fetch(batch)`` for consecutive batches of ``size`` items, the answers in order, with
    :func:`in_flight`'s concurrency; ``progress`` gets the share of items done after each.

    A call the model server refuses for lack of time (422 ``time_limit``: a fine APEM grid,
    many attack steps or SIS passes on a large model) is made again as two calls of half its
    items, down to one item; so an answer may cover fewer than ``size`` items, and callers
    count each answer's items. One item out of time fails the job with the server's reason.
    """
    n, answers = len(items), []
    for start, parts in in_flight(lambda s: _halved_when_out_of_time(fetch, items[s : s + size]), range(0, n, size), concurrency):
        answers.extend(parts)
        if progress is not None:
            progress(min(n, start + size) / n)
    return answers


def _halved_when_out_of_time(fetch: Callable[[Sequence[I]], T], batch: Sequence[I]) -> list[T]:
    """``[fetch(batch)]``, or the answers for its halves (recursively) when it ran out of time."""
    try:
        return [fetch(batch)]
    except ApiError as error:
        if error.code != "time_limit" or len(batch) == 1:
            raise
    half = len(batch) // 2
    return _halved_when_out_of_time(fetch, batch[:half]) + _halved_when_out_of_time(fetch, batch[half:])


def encoded_blob(read: Callable[[str], bytes], sha256: str) -> str:
    """A stored image (or mask) as the base64 a TorchServe request carries."""
    return base64.b64encode(read(sha256)).decode()

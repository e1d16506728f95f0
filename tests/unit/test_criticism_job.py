"""The criticism job's TorchServe calls: all of them, in order, a bounded number at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from service.errors import ApiError
from service.jobs.calls import in_batches, in_flight


class RecordingFetch:
    """A stand-in for one TorchServe call: records how many run at once and which started."""

    def __init__(self, fail_at: int | None = None, together: int = 1) -> None:
        self.lock = threading.Lock()
        self.running, self.most = 0, 0
        self.started: list[int] = []
        self.fail_at = fail_at
        self.first = threading.Barrier(together, timeout=5)  # the first calls meet here
        self.together = together

    def __call__(self, key: int) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(key)
        try:
            if key < self.together:
                self.first.wait()  # breaks (fails the test) unless they all run at once
            time.sleep(0.03 if key % 3 == 0 else 0.01)  # later calls often finish first
            if key == self.fail_at:
                raise RuntimeError("TorchServe said no")
            return key * key
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("concurrency", [1, 3])
def test_results_come_in_order_with_a_bounded_number_of_calls_in_flight(concurrency: int) -> None:
    fetch = RecordingFetch(together=concurrency)
    assert list(in_flight(fetch, range(12), concurrency)) == [(k, k * k) for k in range(12)]
    assert fetch.most == concurrency and sorted(fetch.started) == list(range(12))


@pytest.mark.parametrize("concurrency", [1, 3])
def test_batches_come_in_order_with_the_share_done(concurrency: int) -> None:
    done: list[float] = []
    answers = in_batches(list(range(10)), 4, lambda batch: sum(batch), concurrency, done.append)
    assert answers == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9] and done == [0.4, 0.8, 1.0]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_batches_out_of_time_are_halved_and_other_refusals_are_not(concurrency: int) -> None:
    def fetch(batch: Sequence[int]) -> list[int]:
        if 10 in batch:
            raise ApiError(422, "invalid_image", "not an image")
        if sum(batch) > 8:
            raise ApiError(422, "time_limit", "did not finish within the 540 s this call may work")
        return list(batch)

    done: list[float] = []
    answers = in_batches(list(range(9)), 4, fetch, concurrency, done.append)
    assert answers == [[0, 1, 2, 3], [4], [5], [6], [7], [8]] and done == [4 / 9, 8 / 9, 1.0]
    with pytest.raises(ApiError, match="not an image"):
        in_batches([0, 10], 4, fetch, concurrency)
    with pytest.raises(ApiError, match="540 s"):
        in_batches([0, 9], 4, fetch, concurrency)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_failed_call_stops_the_rest(concurrency: int) -> None:
    fetch = RecordingFetch(fail_at=3)
    with pytest.raises(RuntimeError, match="said no"):
        list(in_flight(fetch, range(100), concurrency))
    time.sleep(0.1)  # let a call that was running finish
    assert max(fetch.started) <= 3 + concurrency  # the failed call and those in flight beside it


def test_the_caller_is_not_kept_waiting_by_running_calls() -> None:
    """An exception in the caller (RQ's job timeout) leaves at once, not after the call."""
    running, slow = threading.Event(), threading.Event()

    def fetch(key: int) -> int:
        if key == 1:
            running.set()
            slow.wait(5)
        return key

    results = in_flight(fetch, range(4), 2)
    assert next(results) == (0, 0)
    assert running.wait(5)  # call 1 is running, not merely queued (a queued one is cancelled)
    start = time.perf_counter()
    results.close()  # what an exception raised in the consuming loop does to the generator
    assert time.perf_counter() - start < 1.0
    slow.set()

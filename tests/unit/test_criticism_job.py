"""The criticism job's TorchServe calls: all of them, in order, a bounded number at a time."""

from __future__ import annotations

import threading
import time

import pytest

from service.jobs.criticism import in_flight


class RecordingFetch:
    """A stand-in for one TorchServe call: records how many run at once and which started."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.lock = threading.Lock()
        self.running, self.most = 0, 0
        self.started: list[int] = []
        self.fail_at = fail_at

    def __call__(self, key: int) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(key)
        try:
            time.sleep(0.03 if key % 3 == 0 else 0.01)  # later calls often finish first
            if key == self.fail_at:
                raise RuntimeError("TorchServe said no")
            return key * key
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("concurrency", [1, 3])
def test_results_come_in_order_with_a_bounded_number_of_calls_in_flight(concurrency: int) -> None:
    fetch = RecordingFetch()
    assert list(in_flight(fetch, range(12), concurrency)) == [(k, k * k) for k in range(12)]
    assert fetch.most == concurrency and sorted(fetch.started) == list(range(12))


def test_a_failed_call_stops_the_rest() -> None:
    fetch = RecordingFetch(fail_at=3)
    with pytest.raises(RuntimeError, match="said no"):
        list(in_flight(fetch, range(100), 2))
    assert max(fetch.started) <= 5  # the failed call and the one or two in flight beside it

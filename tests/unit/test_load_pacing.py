"""The capacity search's per-user pacing: a steady offered rate, no bursts."""

from __future__ import annotations

import random

import numpy as np

from load_tests.pacing import Pacer


def _start_times(users: int, periods: int, task_s: float) -> np.ndarray:
    """When each of ``users`` pacers, all created at t = 0, starts its tasks."""
    rng = random.Random(0)
    starts = []
    for _ in range(users):
        pacer = Pacer(1.0, 0.0, rng)
        now = pacer.first_wait(0.0)
        for _ in range(periods):
            starts.append(now)
            now += task_s
            now += pacer.next_wait(now)
    return np.array(starts)


def test_users_started_together_offer_a_steady_rate() -> None:
    starts = _start_times(users=80, periods=10, task_s=0.03)
    per_100ms = np.bincount((starts * 10).astype(int))[:100]  # 10 s in 100 ms bins
    assert per_100ms.sum() == 800 and per_100ms.mean() == 8
    assert per_100ms.max() <= 17  # one burst of all 80 per second is what Locust's pacing gave
    assert np.ptp(starts.reshape(80, 10), axis=1).max() < 9.0 + 1e-9  # each user: 1 per s


def test_each_user_keeps_its_phase() -> None:
    pacer = Pacer(0.5, 10.0, random.Random(1))
    first = pacer.first_wait(10.0)
    assert 0.0 <= first <= 0.5
    slots = [10.0 + first]
    for task_s in (0.01, 0.2, 0.05):
        slots.append(slots[-1] + task_s + pacer.next_wait(slots[-1] + task_s))
    np.testing.assert_allclose(np.diff(slots), 0.5)


def test_a_late_task_starts_the_next_one_at_once_without_catching_up() -> None:
    pacer = Pacer(1.0, 0.0, random.Random(2))
    start = pacer.first_wait(0.0)
    late_end = start + 3.5  # overran three and a half slots
    assert pacer.next_wait(late_end) == 0.0
    assert abs(pacer.next_wait(late_end + 0.1) - 0.9) < 1e-9  # a period after the late start

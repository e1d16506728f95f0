"""Steady per-user pacing for the capacity search.

A step of ``StepLoad`` starts all its users at once. Locust's ``constant_throughput`` counts
each user's period from the moment the user was created, so a random delay before the first
request is undone from the second request on: every user fires in the same instant once per
period, and the "offered rate" arrives as one burst per second, which the gateway's bound
on predictions in flight refuses in part while the model server idles (measured:
docs/performance.md, "The earlier capacity figures").

:class:`Pacer` keeps each user on its own grid of slots, one period apart, from a random
phase: the users' requests spread evenly over the period, which is the steady rate the
capacity search means to offer.
"""

from __future__ import annotations

import random


class Pacer:
    """Slots ``period`` seconds apart from a random phase; a late task restarts the grid."""

    def __init__(self, period: float, now: float, rng: random.Random | None = None) -> None:
        self.period = period
        self.due = now + (rng or random).uniform(0.0, period)

    def first_wait(self, now: float) -> float:
        """Seconds from ``now`` to this user's first slot."""
        return max(0.0, self.due - now)

    def next_wait(self, now: float) -> float:
        """Seconds from ``now`` (a task just ended) to the next slot.

        On time, the next slot is one period after the last; a task that overran its slot
        starts the next one at once and the grid continues from there (no catch-up burst).
        """
        self.due = max(self.due + self.period, now)
        return self.due - now

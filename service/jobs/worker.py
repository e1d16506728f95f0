"""The RQ worker: ``python -m service.jobs.worker`` (runs RQ's scheduler too, for retries).

Abandoned jobs are found quickly: the worker heartbeats a running job every
``BEYOND_WORKER_MONITOR_INTERVAL_S`` with a grace of ``BEYOND_WORKER_HEARTBEAT_GRACE_S``
(RQ's fixed grace is 60 s), and maintenance (which retries or fails jobs whose worker
stopped heartbeating) runs every ``BEYOND_WORKER_MAINTENANCE_INTERVAL_S`` (RQ: 600 s).
Failures that retrying cannot fix (a :class:`JobFailure`, a timeout) are not retried.
Outcomes are counted in the ``beyond:job_outcomes`` hash for the gateway's metrics. A Redis
outage does not end the worker: it reconnects with backoff (:func:`serve`).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from service.gateway.metrics import OUTCOMES_KEY
from service.jobs import tasks  # noqa: F401 - imported once here: each forked work horse inherits the job functions
from service.settings import Settings, get_settings

log = logging.getLogger("beyond.worker")
NOT_RETRIED = ("JobFailure", "JobTimeoutException")
MAX_RECONNECT_DELAY_S = 30.0


class BeyondWorker(Worker):
    heartbeat_grace_s = 10

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        if job.timeout and job.timeout > 0:
            remaining = max(job.timeout - working_time, 0)
            return int(min(remaining, self.job_monitoring_interval)) + self.heartbeat_grace_s
        return self.job_monitoring_interval + self.heartbeat_grace_s

    def _count(self, job: Job, outcome: str) -> None:
        try:
            self.connection.hincrby(OUTCOMES_KEY, f"{job.meta.get('type', 'unknown')}:{outcome}", 1)
        except Exception:  # metrics must never fail a job
            log.warning("could not count job outcome")

    def handle_job_success(self, job, queue, started_job_registry, execution):  # type: ignore[no-untyped-def]
        super().handle_job_success(job, queue, started_job_registry, execution)
        self._count(job, "finished")

    def handle_job_failure(
        self, job, queue, started_job_registry=None, exc_string="", execution=None
    ):  # type: ignore[no-untyped-def]
        if any(name in (exc_string or "") for name in NOT_RETRIED):
            job.retries_left = 0
        retrying = job.should_retry and self._stopped_job_id != job.id
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        self._count(job, "retried" if retrying else "failed")


def build_worker(
    settings: Settings, redis: Redis | None = None, name: str | None = None
) -> BeyondWorker:
    redis = redis or Redis.from_url(settings.redis_url)
    BeyondWorker.heartbeat_grace_s = settings.worker_heartbeat_grace_s
    return BeyondWorker(
        [settings.queue_name],
        name=name,
        connection=redis,
        serializer=JSONSerializer,
        default_result_ttl=settings.result_ttl_s,
        maintenance_interval=settings.worker_maintenance_interval_s,
        job_monitoring_interval=settings.worker_monitor_interval_s,
        worker_ttl=settings.worker_ttl_s,
    )


def main() -> int:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return serve(settings, os.environ.get("BEYOND_WORKER_NAME"))


def serve(settings: Settings, name: str | None) -> int:
    """Work until stopped, outliving Redis outages: when Redis goes away RQ's loop raises
    (it "found an unhandled exception"), so the worker waits with backoff (1 s doubling to
    :data:`MAX_RECONNECT_DELAY_S`), drops its own stale registration and works again. A job
    it was running when Redis went away is re-queued by maintenance once its heartbeat ends."""
    delay = 1.0
    while True:
        worker = build_worker(settings, name=name)
        try:
            worker.connection.delete(worker.key)  # our registration from before an outage
            delay = 1.0
            worker.work(with_scheduler=True, logging_level=settings.log_level)
            return 0
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("Redis is unreachable (%s); reconnecting in %.0f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY_S)


if __name__ == "__main__":
    sys.exit(main())

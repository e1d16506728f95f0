"""Prometheus metrics: requests and latencies per route and model, queue depth, job outcomes.

Each app owns its own ``CollectorRegistry`` (so tests can build many apps). Queue depth and
job outcomes are read from Redis at scrape time: the registries RQ keeps, plus the
``beyond:job_outcomes`` hash the workers increment (see ``service.jobs.worker``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import (
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("beyond.metrics")
OUTCOMES_KEY = "beyond:job_outcomes"


class QueueCollector(Collector):
    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "beyond_queue_jobs", "Jobs in the RQ queue and its registries", labels=["state"]
        )
        outcomes = CounterMetricFamily(
            "beyond_job_outcomes", "Jobs ended, by type and outcome", labels=["type", "outcome"]
        )
        try:
            queue = Queue(self.queue_name, connection=self.redis)
            depth.add_metric(["queued"], queue.count)
            for state, registry_cls in (
                ("started", StartedJobRegistry),
                ("finished", FinishedJobRegistry),
                ("failed", FailedJobRegistry),
                ("scheduled", ScheduledJobRegistry),
            ):
                depth.add_metric([state], registry_cls(queue=queue).count)
            for field, value in self.redis.hgetall(OUTCOMES_KEY).items():
                job_type, _, outcome = field.decode().partition(":")
                outcomes.add_metric([job_type, outcome], float(value))
        except RedisError:
            log.warning("metrics: Redis unavailable")
            return []
        return [depth, outcomes]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "beyond_http_requests",
            "HTTP requests by route, method, model and status",
            ["route", "method", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "beyond_http_request_duration_seconds",
            "HTTP request latency by route and model",
            ["route", "method", "model"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )

    def add_queue_collector(self, redis: Redis, queue_name: str) -> None:
        self.registry.register(QueueCollector(redis, queue_name))


class MetricsMiddleware:
    """Count and time every HTTP request under its route template (not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, models: Iterable[str] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.models = frozenset(models)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            model = str(scope.get("path_params", {}).get("model", ""))
            if route == "unmatched" or (model and model not in self.models):
                model = "other" if model else ""
            method = scope["method"]
            self.metrics.requests.labels(route, method, model, str(status)).inc()
            self.metrics.latency.labels(route, method, model).observe(time.perf_counter() - start)

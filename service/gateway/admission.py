"""Admission control: a bounded number of requests in flight per route class, no queue.

Above capacity a queue in front of the model server only turns every request into a slow
one and, in the end, into a client timeout. Instead the gateway counts the requests of each
class that are in progress (body upload, decoding, the TorchServe call, the reply) and
answers any request that would exceed the class's bound at once with **429** and
``Retry-After``, before a byte of its body is read. The bound itself is the only queue:
with ``limit`` requests in flight and a model server doing ``r`` requests per second, no
admitted request waits much longer than ``limit / r`` seconds.

The counters are plain integers: the gateway runs one event loop per process, and an ASGI
call increments and decrements them without awaiting in between, so no lock is needed.
With several gateway processes each has its own bounds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send


@dataclass(frozen=True)
class RouteClass:
    """Requests whose ``METHOD path`` matches ``pattern`` share ``limit`` slots."""

    name: str
    pattern: re.Pattern[str]
    limit: int

    def matches(self, method: str, path: str) -> bool:
        return self.pattern.fullmatch(f"{method} {path}") is not None


def route_classes(predict: int, explain: int, uploads: int) -> list[RouteClass]:
    """The gateway's classes: cheap predictions, heavy single-image tasks, dataset uploads."""
    model = r"/v1/models/[^/]+"
    return [
        RouteClass("predict", re.compile(rf"POST {model}/predict/?"), predict),
        RouteClass("explain", re.compile(rf"POST {model}/(explain|attack|apem)/?"), explain),
        RouteClass("upload", re.compile(r"POST /v1/datasets/?"), uploads),
    ]


class AdmissionMetrics:
    """In-flight gauge and rejection counter, registered on the app's own registry."""

    def __init__(self, registry: object) -> None:
        self.inflight = Gauge(
            "beyond_inflight_requests",
            "Requests in progress per admission class",
            ["route_class"],
            registry=registry,  # type: ignore[arg-type]
        )
        self.rejected = Counter(
            "beyond_admission_rejected",
            "Requests answered 429 because their class was at its in-flight bound",
            ["route_class"],
            registry=registry,  # type: ignore[arg-type]
        )


class AdmissionMiddleware:
    """Pure ASGI middleware: 429 + ``Retry-After`` when a route class is at its bound."""

    def __init__(
        self,
        app: ASGIApp,
        classes: Sequence[RouteClass],
        retry_after_s: int,
        metrics: AdmissionMetrics | None = None,
    ) -> None:
        self.app = app
        self.classes = list(classes)
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.inflight = {c.name: 0 for c in self.classes}

    def classify(self, method: str, path: str) -> RouteClass | None:
        for route_class in self.classes:
            if route_class.matches(method, path):
                return route_class
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route_class = None
        if scope["type"] == "http":
            route_class = self.classify(scope["method"], scope["path"])
        if route_class is None:
            await self.app(scope, receive, send)
            return
        name = route_class.name
        if self.inflight[name] >= route_class.limit:
            if self.metrics is not None:
                self.metrics.rejected.labels(name).inc()
            await self._reject(send, route_class)
            return
        self.inflight[name] += 1
        if self.metrics is not None:
            self.metrics.inflight.labels(name).set(self.inflight[name])
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight[name] -= 1
            if self.metrics is not None:
                self.metrics.inflight.labels(name).set(self.inflight[name])

    async def _reject(self, send: Send, route_class: RouteClass) -> None:
        message = (
            f"the gateway is at its limit of {route_class.limit} {route_class.name} requests "
            f"in flight; retry after {self.retry_after_s} s"
        )
        body = json.dumps({"error": {"code": "overloaded", "message": message}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.retry_after_s).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

"""Liveness, readiness and Prometheus metrics (no auth; bind the gateway to a trusted network)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol.contract import ErrorDetail
from service.gateway.deps import ModelRegistry, SettingsDep, TorchServe
from service.gateway.schemas import HealthResponse, ReadyResponse
from service.redis_health import redis_problem

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "a dependency is down"}},
)
async def readyz(request: Request, torchserve: TorchServe, settings: SettingsDep) -> JSONResponse:
    """Ready when Redis answers and every configured model answers on the model server: its
    ``/ping`` alone turns green as soon as its port opens, before the models have loaded.
    While it is away the cached model answers are dropped, so after a restart each model
    must answer again."""
    registry: ModelRegistry = request.app.state.registry
    ts_problem, redis_issue = await asyncio.gather(
        torchserve.ping(), redis_problem(request.app.state.async_redis)
    )
    if ts_problem is None:
        unserved = await registry.unserved()
        if unserved:
            ts_problem = "models not served: " + ", ".join(f"{m} ({why})" for m, why in unserved.items())
    else:
        registry.forget()
    checks = {"torchserve": ts_problem or "ok", "redis": redis_issue or "ok"}
    down = {name: why for name, why in checks.items() if why != "ok"}
    if not down:
        return JSONResponse(ReadyResponse(status="ready", checks=checks).model_dump(mode="json"))
    message = "; ".join(f"{name}: {why}" for name, why in down.items())
    body = ReadyResponse(
        status="not_ready", checks=checks, error=ErrorDetail(code="not_ready", message=message)
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    data = generate_latest(request.app.state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)

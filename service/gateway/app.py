"""The gateway application factory: ``create_app(settings)``.

Middleware (outermost first): Prometheus request metrics, then admission control (429 with
``Retry-After`` when a route class has too many requests in flight), then the streaming
body-size limit, then FastAPI's routing with the error handlers of ``service.errors``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from service.errors import install_error_handlers
from service.gateway.admission import AdmissionMetrics, AdmissionMiddleware, route_classes
from service.gateway.deps import ModelRegistry
from service.gateway.metrics import GatewayMetrics, MetricsMiddleware
from service.gateway.routers import datasets, health, inference, jobs, models
from service.gateway.upload import BodyLimit, BodyLimitMiddleware
from service.settings import Settings, get_settings
from service.torchserve_client import AsyncTorchServeClient

log = logging.getLogger("beyond.gateway")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway for ``settings`` (default: :func:`get_settings`)."""
    settings = settings or get_settings()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = AsyncTorchServeClient(settings)
        redis_kwargs = {
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
            "health_check_interval": 10,
        }
        app.state.torchserve = client
        app.state.registry = ModelRegistry(settings, client)
        app.state.redis = Redis.from_url(settings.redis_url, **redis_kwargs)
        app.state.async_redis = AsyncRedis.from_url(settings.redis_url, **redis_kwargs)
        metrics.add_queue_collector(app.state.redis, settings.queue_name)
        if not settings.resolved_api_keys():
            log.warning("no API key configured: every /v1 request will be refused (401)")
        try:
            yield
        finally:
            await client.aclose()
            await app.state.async_redis.aclose()
            app.state.redis.close()

    app = FastAPI(
        title="Beyond",
        version="1.0",
        summary="Image classifiers served with the evidence needed to trust or distrust them",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    form_limits = {
        "max_fields": settings.max_form_fields,
        "max_files": 2,
        "max_part_size": 1024 * 1024,
    }
    for module in (health, models, jobs):
        app.include_router(module.router)
    for module in (inference, datasets):
        app.include_router(module.router, form_limits=form_limits)
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_upload_bytes,
        limits=[
            BodyLimit("POST", "/v1/datasets", settings.max_archive_bytes),
            BodyLimit("POST", "/v1/jobs", settings.max_json_bytes),
        ],
    )
    app.add_middleware(
        AdmissionMiddleware,
        classes=route_classes(
            settings.max_inflight_predict,
            settings.max_inflight_explain,
            settings.max_inflight_uploads,
        ),
        retry_after_s=settings.overload_retry_after_s,
        metrics=AdmissionMetrics(metrics.registry),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, models=settings.models)
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory service.gateway.app:app_from_env``."""
    return create_app(get_settings())

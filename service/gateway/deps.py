"""FastAPI dependencies as ``Annotated`` aliases: settings, auth, clients, model lookup.

Every dependency is ``async def`` even where it awaits nothing: FastAPI runs a plain
``def`` dependency in the thread pool, a hop that costs CPU on every dependency of every
request (benchmarks/results/service.md).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated

from fastapi import Depends, Path, Request
from redis import Redis

from protocol.contract import DescribeResult
from service.errors import ApiError
from service.settings import Settings
from service.torchserve_client import AsyncTorchServeClient


async def app_settings(request: Request) -> Settings:
    """The settings the app was built with (``create_app``). Not ``dependency_overrides``:
    with any override in place FastAPI rebuilds every dependency of every request
    (benchmarks/results/service.md)."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(app_settings)]


async def require_key(request: Request, settings: SettingsDep) -> str:
    """Check ``Authorization: Bearer <key>``; return a non-secret key id (its index)."""
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    unauthorized = ApiError(
        401, "unauthorized", "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
    )
    if scheme.lower() != "bearer" or not presented.strip():
        raise unauthorized
    presented_b = presented.strip().encode()
    match = None
    for index, key in enumerate(settings.resolved_api_keys()):
        if hmac.compare_digest(presented_b, key.encode()):
            match = index
    if match is None:
        raise unauthorized
    return f"key-{match}"


ApiKey = Annotated[str, Depends(require_key)]


async def get_torchserve(request: Request) -> AsyncTorchServeClient:
    return request.app.state.torchserve


TorchServe = Annotated[AsyncTorchServeClient, Depends(get_torchserve)]


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


RedisDep = Annotated[Redis, Depends(get_redis)]


class ModelRegistry:
    """The served models' ``describe`` answers, cached; only configured names exist, and one
    the model server does not know yet is loading (503 ``model_loading`` with
    ``Retry-After``), not missing."""

    def __init__(self, settings: Settings, client: AsyncTorchServeClient) -> None:
        self.settings = settings
        self.client = client
        self._cache: dict[str, tuple[float, DescribeResult]] = {}
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> DescribeResult:
        if name not in self.settings.models:
            raise ApiError(404, "model_not_found", f"unknown model {name!r}")
        hit = self._cache.get(name)
        if hit and time.monotonic() - hit[0] < self.settings.describe_cache_s:
            return hit[1]
        async with self._lock:
            hit = self._cache.get(name)
            if hit and time.monotonic() - hit[0] < self.settings.describe_cache_s:
                return hit[1]
            try:
                described = await self.client.describe(name)
            except ApiError as exc:
                if exc.status not in (404, 504):
                    raise
                # a configured model the model server does not know (yet), or does not answer
                # for while its workers start: it is loading, after a start or a restart (or
                # it failed to load, or its queue is long); either way, retry later
                raise ApiError(
                    503,
                    "model_loading",
                    f"the model {name!r} is not answering on the model server yet; retry later",
                    headers={"Retry-After": str(self.settings.torchserve_retry_after_s)},
                ) from None
            self._cache[name] = (time.monotonic(), described)
            return described

    def forget(self) -> None:
        """Drop every cached answer (the model server went away: when it is back, each model
        must answer again before it counts as served)."""
        self._cache.clear()

    async def unserved(self) -> dict[str, str]:
        """The configured models that do not answer ``describe`` now (cached answers count),
        each with the reason."""
        problems: dict[str, str] = {}
        for name in self.settings.models:
            try:
                await self.get(name)
            except ApiError as exc:
                problems[name] = exc.code
        return problems


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


Registry = Annotated[ModelRegistry, Depends(get_registry)]


async def described_model(
    model: Annotated[str, Path(min_length=1, max_length=100)], registry: Registry
) -> DescribeResult:
    return await registry.get(model)


DescribedModel = Annotated[DescribeResult, Depends(described_model)]

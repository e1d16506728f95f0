"""Admission control: bounded requests in flight per route class, 429 + Retry-After beyond."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from service.gateway.admission import AdmissionMiddleware, route_classes
from service.gateway.app import create_app
from service.settings import Settings
from tests.unit import fake_torchserve
from tests.unit.conftest import API_KEY
from tests.unit.test_gateway import png


class Blocking:
    """An ASGI app whose requests wait until ``release`` is set (or fail when asked to)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.entered += 1
        await self.release.wait()
        if scope["path"].endswith("/apem"):
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_classes() -> None:
    middleware = AdmissionMiddleware(Blocking(), route_classes(3, 2, 1), retry_after_s=1)
    name = lambda method, path: getattr(middleware.classify(method, path), "name", None)  # noqa: E731
    assert name("POST", "/v1/models/m/predict") == "predict"
    assert name("POST", "/v1/models/m-1/explain") == "explain"
    assert name("POST", "/v1/models/m/attack") == "explain"
    assert name("POST", "/v1/models/m/apem") == "explain"
    assert name("POST", "/v1/datasets") == "upload"
    for method, path in [
        ("GET", "/v1/models/m/predict"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/abc"),
        ("POST", "/v1/models/m/predict/extra"),
    ]:
        assert name(method, path) is None, (method, path)


async def _flood() -> None:
    app = Blocking()
    middleware = AdmissionMiddleware(app, route_classes(2, 1, 1), retry_after_s=3)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        held = [
            asyncio.create_task(client.post("/v1/models/m/predict", content=b"x")) for _ in range(2)
        ]
        held.append(asyncio.create_task(client.post("/v1/models/m/explain", content=b"x")))
        while app.entered < 3:
            await asyncio.sleep(0.001)
        assert middleware.inflight == {"predict": 2, "explain": 1, "upload": 0}

        # both classes are full: refused at once, without reaching the app
        start = time.perf_counter()
        for path in ("/v1/models/m/predict", "/v1/models/other/explain"):
            reply = await client.post(path, content=b"x")
            assert reply.status_code == 429
            assert reply.headers["retry-after"] == "3"
            assert reply.json()["error"]["code"] == "overloaded"
        assert time.perf_counter() - start < 0.5
        assert app.entered == 3
        # other routes and classes are not limited by them
        upload = asyncio.create_task(client.post("/v1/datasets", content=b"x"))
        while app.entered < 4:
            await asyncio.sleep(0.001)

        app.release.set()
        replies = await asyncio.gather(*held, upload)
        assert [r.status_code for r in replies] == [200, 200, 200, 200]
        assert middleware.inflight == {"predict": 0, "explain": 0, "upload": 0}

        # a slot is given back when the app raises, too
        with pytest.raises(RuntimeError):
            await client.post("/v1/models/m/apem", content=b"x")
        assert middleware.inflight["explain"] == 0
        # recovered: admitted again
        assert (await client.post("/v1/models/m/predict", content=b"x")).status_code == 200


def test_bound_refuses_and_recovers() -> None:
    asyncio.run(_flood())


async def _gateway_flood(settings: Settings) -> None:
    """Two predictions held in the (real, HTTP) fake TorchServe fill a bound of two."""
    held_state = fake_torchserve.State
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    files = {"image": ("x.png", png(), "image/png")}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gw", headers=headers
        ) as client:
            url = "/v1/models/shapes-resnet/predict"
            held = [asyncio.create_task(client.post(url, files=files)) for _ in range(2)]
            while held_state.waiting < 2:
                await asyncio.sleep(0.005)
            refused = await client.post(url, files=files)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "2"
            assert set(refused.json()) == {"error"}
            metrics = (await client.get("/metrics")).text
            assert 'beyond_inflight_requests{route_class="predict"} 2.0' in metrics
            assert 'beyond_admission_rejected_total{route_class="predict"} 1.0' in metrics
            held_state.release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert (await client.post(url, files=files)).status_code == 200


def test_gateway_answers_429_when_predict_is_full(settings: Settings) -> None:
    tight = settings.model_copy(update={"max_inflight_predict": 2, "overload_retry_after_s": 2})
    state = fake_torchserve.State
    state.mode, state.waiting = "held", 0
    state.release.clear()
    try:
        asyncio.run(_gateway_flood(tight))
    finally:
        state.mode = "ok"
        state.release.set()


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEYOND_MAX_INFLIGHT_PREDICT", "7")
    monkeypatch.setenv("BEYOND_MAX_INFLIGHT_EXPLAIN", "3")
    monkeypatch.setenv("BEYOND_OVERLOAD_RETRY_AFTER_S", "5")
    settings = Settings()
    assert (settings.max_inflight_predict, settings.max_inflight_explain) == (7, 3)
    assert settings.overload_retry_after_s == 5
    monkeypatch.setenv("BEYOND_MAX_INFLIGHT_PREDICT", "0")
    with pytest.raises(ValueError):
        Settings()


def test_full_connection_pool_is_busy_with_retry_after() -> None:
    from service.torchserve_client import _transport_error

    busy = _transport_error(httpx.PoolTimeout("pool"), retry_after_s=4)
    assert (busy.status, busy.code, busy.headers) == (
        503,
        "model_server_busy",
        {"Retry-After": "4"},
    )
    assert _transport_error(httpx.ReadTimeout("read"), retry_after_s=4).status == 504
    assert _transport_error(httpx.ConnectTimeout("connect"), retry_after_s=4).status == 503


def test_gateway_client_maps_aiohttp_failures() -> None:
    """Pool wait or connect timeout: busy with Retry-After; read timeout: 504; refused: 503."""
    import aiohttp

    from service.torchserve_client import _async_transport_error

    busy = _async_transport_error(aiohttp.ConnectionTimeoutError("pool"), retry_after_s=4)
    assert (busy.status, busy.code, busy.headers) == (503, "model_server_busy", {"Retry-After": "4"})
    assert _async_transport_error(aiohttp.SocketTimeoutError("read"), retry_after_s=4).status == 504
    refused = _async_transport_error(aiohttp.ClientConnectionError("refused"), retry_after_s=4)
    assert (refused.status, refused.code) == (503, "model_server_unavailable")

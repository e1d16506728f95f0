"""Authenticating front for one pod's TorchServe, for Kubernetes (docs/deploy.md).

``uvicorn --factory service.torchserve_proxy:app_from_env``

Every TorchServe generates its own random tokens at start-up (``key_file.json`` in its
working folder), so replicas behind one Service cannot share them with the gateway. This
proxy runs in the same pod as TorchServe and owns the only port the Service exposes:

* it accepts the release-wide token ``BEYOND_TORCHSERVE_TOKEN`` -- the one the gateway and
  the workers send (``TokenSource``) -- compared in constant time;
* it forwards to the pod's TorchServe at ``BEYOND_TORCHSERVE_URL`` (loopback) with that
  TorchServe's own inference token, read from ``BEYOND_TORCHSERVE_KEY_FILE`` (re-read when
  the file changes);
* only ``GET /ping`` and ``POST /predictions/{model}`` pass; every other path -- the
  management and token APIs above all -- answers 404. TorchServe 0.12 wants the inference
  token on ``/ping`` as well; the proxy adds it, so ``/ping`` through the proxy needs none
  (it tells only whether the models are loaded);
* ``/healthz`` (the proxy is alive) and ``/readyz`` (the key file is readable and TorchServe
  answers its ping) are for the kubelet's probes.

Failures read like TorchServe's own (JSON ``code``/``type``/``message``), so the gateway's
reply mapping applies unchanged: unreachable, no token yet or the pod's token refused
(TorchServe's 400 ``InvalidKeyException``) -> 503 with ``Retry-After``, read timeout -> 504.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from protocol.contract import TIME_LIMIT_HEADER
from protocol.frames import MAX_MESSAGE_MB
from service.settings import Settings, get_settings
from service.torchserve_client import TokenSource

log = logging.getLogger("beyond.torchserve_proxy")

#: TorchServe's request cap in our configuration (``TorchServeProcess.max_message_mb``).
MAX_BODY_BYTES = MAX_MESSAGE_MB * 1024 * 1024
#: Response headers passed back from TorchServe (the rest are hop-by-hop or its own; the
#: body is passed decoded, so its length and encoding headers do not apply).
PASSED_HEADERS = ("content-type", "retry-after")
#: Model names and versions as TorchServe accepts them; anything else never leaves the proxy.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _error(status: int, kind: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"code": status, "type": kind, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    """The request body is over :data:`MAX_BODY_BYTES`."""


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class TorchServeProxy:
    """The proxy's request handlers around one pooled client to the local TorchServe."""

    def __init__(
        self,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        token = settings.torchserve_token.get_secret_value() if settings.torchserve_token else ""
        if not token:
            raise RuntimeError("BEYOND_TORCHSERVE_TOKEN must hold the token clients present")
        if settings.torchserve_key_file is None:
            raise RuntimeError("BEYOND_TORCHSERVE_KEY_FILE must name TorchServe's key_file.json")
        self._expected = token.encode()
        self._upstream_token = TokenSource(None, settings.torchserve_key_file)
        self._retry_after = settings.torchserve_retry_after_s
        self._max_body = max_body_bytes
        # the caller (gateway or worker) times out first and answers its own 504
        waits = max(settings.torchserve_timeout_s, settings.torchserve_job_timeout_s)
        timeout = httpx.Timeout(waits + 5, connect=settings.torchserve_connect_timeout_s)
        limits = httpx.Limits(
            max_connections=settings.torchserve_max_connections,
            max_keepalive_connections=settings.torchserve_max_connections,
        )
        self.client = httpx.AsyncClient(
            base_url=settings.torchserve_url,
            timeout=timeout,
            limits=limits,
            transport=transport,
            trust_env=False,
        )

    def _authorized(self, request: Request) -> bool:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        return hmac.compare_digest(presented.strip().encode(), self._expected)

    async def _forward(self, request: httpx.Request) -> Response:
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                return _error(
                    503, "ServiceUnavailable", "TorchServe is unreachable", self._retry_after
                )
            return _error(504, "GatewayTimeout", "TorchServe did not answer in time")
        except httpx.HTTPError:
            return _error(503, "ServiceUnavailable", "TorchServe is unreachable", self._retry_after)
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        if upstream.status_code in (400, 401, 403):
            # TorchServe 0.12 answers a refused token with 400 InvalidKeyException
            body = await upstream.aread()
            await upstream.aclose()
            if upstream.status_code != 400 or b"InvalidKeyException" in body:
                log.error("TorchServe refused this pod's token (status %s)", upstream.status_code)
                return _error(
                    503, "ServiceUnavailable", "TorchServe is not ready", self._retry_after
                )
            return Response(body, status_code=upstream.status_code, headers=headers)
        return StreamingResponse(
            upstream.aiter_bytes(),
            status_code=upstream.status_code,
            headers=headers,
            background=BackgroundTask(upstream.aclose),
        )

    async def predictions(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "Unauthorized", "missing or wrong bearer token")
        parts = [request.path_params["model"]]
        if "version" in request.path_params:
            parts.append(request.path_params["version"])
        if not all(NAME.fullmatch(p) and ".." not in p for p in parts):
            return _error(404, "NotFound", "not served here")
        path = "/predictions/" + "/".join(parts)
        headers = self._upstream_headers()
        if headers is None:
            return _error(503, "ServiceUnavailable", "TorchServe is not ready", self._retry_after)
        try:
            body = await _read_body(request, self._max_body)
        except BodyTooLarge:
            return _error(413, "RequestEntityTooLarge", "request body too large")
        for name in ("content-type", TIME_LIMIT_HEADER.lower()):
            if name in request.headers:
                headers[name] = request.headers[name]
        upstream = self.client.build_request("POST", path, content=body, headers=headers)
        return await self._forward(upstream)

    def _upstream_headers(self) -> dict[str, str] | None:
        token = self._upstream_token.token()
        return {"Authorization": f"Bearer {token}"} if token else None

    async def ping(self, request: Request) -> Response:
        headers = self._upstream_headers()
        if headers is None:
            return _error(503, "ServiceUnavailable", "TorchServe is not ready", self._retry_after)
        return await self._forward(self.client.build_request("GET", "/ping", headers=headers))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        headers = self._upstream_headers()
        if headers is None:
            return JSONResponse({"status": "not_ready", "reason": "no TorchServe token"}, 503)
        try:
            reply = await self.client.get("/ping", headers=headers)
        except httpx.HTTPError:
            return JSONResponse({"status": "not_ready", "reason": "TorchServe unreachable"}, 503)
        if reply.status_code != 200:
            reason = f"TorchServe ping answered {reply.status_code}"
            return JSONResponse({"status": "not_ready", "reason": reason}, 503)
        return JSONResponse({"status": "ready"})


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, "NotFound", "not served here")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return _error(405, "MethodNotAllowed", "method not allowed")


def create_app(
    settings: Settings | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> Starlette:
    """The proxy application for ``settings`` (default: :func:`get_settings`)."""
    proxy = TorchServeProxy(settings or get_settings(), transport)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await proxy.client.aclose()

    routes = [
        Route("/predictions/{model}", proxy.predictions, methods=["POST"]),
        Route("/predictions/{model}/{version}", proxy.predictions, methods=["POST"]),
        Route("/ping", proxy.ping, methods=["GET"]),
        Route("/healthz", proxy.healthz, methods=["GET"]),
        Route("/readyz", proxy.readyz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_allowed},
    )
    app.state.proxy = proxy
    return app


def app_from_env() -> Starlette:
    """``uvicorn --factory service.torchserve_proxy:app_from_env``."""
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return create_app(settings)

"""Clients for TorchServe's inference API speaking the contract of ``protocol.contract``.

:class:`AsyncTorchServeClient` (gateway: one pooled ``aiohttp.ClientSession``) and
:class:`SyncTorchServeClient` (RQ workers: ``httpx``) share the request building and reply
mapping below. A request whose images are raw pixels goes as a binary frame
(:mod:`protocol.frames`), any other as JSON. The gateway uses aiohttp because its client is
on every request's path, and it posts a body for a fraction of httpx's CPU
(benchmarks/results/service.md). Every TorchServe failure becomes an
:class:`~service.errors.ApiError` with a status the gateway can answer as is: unreachable ->
503, read timeout -> 504, TorchServe's own 503 (no worker / queue full) and a full
connection pool -> 503 with ``Retry-After``, the handler's ``ErrorBody`` -> its 4xx with
code and message, anything else -> 502. The inference token is read from TorchServe's key
file (re-read when the file changes) and never logged or echoed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TypeVar

import aiohttp
import httpx
from pydantic import BaseModel, ValidationError

from protocol.contract import TIME_LIMIT_HEADER, DescribeRequest, DescribeResult, ErrorBody
from protocol.frames import encode_request
from service.errors import ApiError
from service.settings import Settings

log = logging.getLogger("beyond.torchserve")
R = TypeVar("R", bound=BaseModel)


class TokenSource:
    """The inference token: a fixed one from settings, or read from TorchServe's key file."""

    def __init__(self, token: str | None = None, key_file: Path | None = None) -> None:
        self._fixed = token
        self._key_file = key_file
        self._cached: tuple[float, str | None] = (-1.0, None)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenSource:
        token = settings.torchserve_token.get_secret_value() if settings.torchserve_token else None
        return cls(token, settings.torchserve_key_file)

    def token(self) -> str | None:
        if self._fixed:
            return self._fixed
        if self._key_file is None:
            return None
        try:
            mtime = os.stat(self._key_file).st_mtime
        except OSError:
            return None
        if mtime != self._cached[0]:
            try:
                data = json.loads(Path(self._key_file).read_text())
                self._cached = (mtime, str(data["inference"]["key"]))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("TorchServe key file is unreadable")
                return None
        return self._cached[1]

    def headers(self) -> dict[str, str]:
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}


def _model_path(model: str) -> str:
    return f"/predictions/{model}"


def _busy(retry_after_s: int, message: str) -> ApiError:
    """503 ``model_server_busy`` with ``Retry-After``: the client should back off and retry."""
    return ApiError(503, "model_server_busy", message, headers={"Retry-After": str(retry_after_s)})


def _unavailable(retry_after_s: int, message: str) -> ApiError:
    """503 ``model_server_unavailable`` with ``Retry-After``: the model server is away (down,
    restarting, or refusing the gateway's token); a client may retry after it."""
    return ApiError(
        503, "model_server_unavailable", message, headers={"Retry-After": str(retry_after_s)}
    )


def map_reply(status: int, content: bytes, result_model: type[R], retry_after_s: int) -> R:
    """Validate a TorchServe reply into ``result_model`` or raise the matching ApiError."""
    if status == 200:
        try:
            return result_model.model_validate_json(content)
        except ValidationError:
            log.error("TorchServe reply does not match %s", result_model.__name__)
            raise ApiError(
                502, "bad_model_reply", "the model server sent an invalid reply"
            ) from None
    if status == 503 or status == 429:
        raise _busy(retry_after_s, "the model server is busy or has no free worker; retry later")
    if status in (401, 403):
        log.error("TorchServe refused the inference token (status %s)", status)
        raise _unavailable(retry_after_s, "the model server refused the gateway")
    body = None
    try:
        body = ErrorBody.model_validate_json(content)
    except ValidationError:
        body = None
    if body is not None and 400 <= status < 500:
        out = 422 if status == 400 else status
        return_status = out if out in (404, 409, 413, 415, 422) else 422
        raise ApiError(return_status, body.error.code, body.error.message)
    if status == 404:
        raise ApiError(404, "model_not_found", "the model is not served")
    if status == 413:
        raise ApiError(413, "payload_too_large", "the model server refused the request size")
    if status == 507:
        raise _busy(retry_after_s, "the model server is out of memory; retry later")
    log.error("TorchServe answered %s", status)
    raise ApiError(502, "model_server_error", "the model server failed to answer the request")


def _transport_error(exc: httpx.HTTPError, retry_after_s: int) -> ApiError:
    if isinstance(exc, httpx.PoolTimeout):  # every pooled connection is busy: back off
        return _busy(retry_after_s, "all connections to the model server are busy; retry later")
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return ApiError(504, "model_server_timeout", "the model server did not answer in time")
    return _unavailable(retry_after_s, "the model server is unreachable")


def _async_transport_error(exc: Exception, retry_after_s: int) -> ApiError:
    """aiohttp's failures, mapped like :func:`_transport_error`.

    aiohttp's connect timeout also covers waiting for a pooled connection, so a connect
    timeout is answered as busy (503 with ``Retry-After``); a refused connection is
    unreachable and a read timeout is 504.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _busy(retry_after_s, "all connections to the model server are busy; retry later")
    if isinstance(exc, (aiohttp.SocketTimeoutError, TimeoutError)):
        return ApiError(504, "model_server_timeout", "the model server did not answer in time")
    return _unavailable(retry_after_s, "the model server is unreachable")


def _call_headers(content_type: str, waits_s: float, tokens: TokenSource) -> dict[str, str]:
    """Headers of a call: its body's type, how long the caller waits (the handler stops its
    work a little sooner) and TorchServe's token."""
    return {"Content-Type": content_type, TIME_LIMIT_HEADER: f"{waits_s:g}", **tokens.headers()}


def _timeout(settings: Settings, read_s: float) -> httpx.Timeout:
    return httpx.Timeout(
        read_s,
        connect=settings.torchserve_connect_timeout_s,
        pool=settings.torchserve_connect_timeout_s,
    )


def _async_timeout(settings: Settings, read_s: float | None = None) -> aiohttp.ClientTimeout:
    """``connect`` (pool wait included) and per-read limits; no limit on the whole call."""
    return aiohttp.ClientTimeout(
        total=None,
        connect=settings.torchserve_connect_timeout_s,
        sock_read=read_s or settings.torchserve_timeout_s,
    )


class AsyncTorchServeClient:
    """Pooled async client for the gateway (one session, keep-alive connections).

    Create it inside the running event loop (the gateway's lifespan) and close it there.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = TokenSource.from_settings(settings)
        connector = aiohttp.TCPConnector(
            limit=settings.torchserve_max_connections, limit_per_host=0, use_dns_cache=True
        )
        self._session = aiohttp.ClientSession(
            base_url=settings.torchserve_url.rstrip("/") + "/",
            connector=connector,
            timeout=_async_timeout(settings),
            trust_env=False,
            skip_auto_headers=("User-Agent",),
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def call(
        self, model: str, request: BaseModel, result_model: type[R], timeout: float | None = None
    ) -> R:
        body, content_type = encode_request(request)
        headers = _call_headers(content_type, timeout or self.settings.torchserve_timeout_s, self.tokens)
        extra = {} if timeout is None else {"timeout": _async_timeout(self.settings, timeout)}
        retry_after_s = self.settings.torchserve_retry_after_s
        try:
            async with self._session.post(
                _model_path(model).lstrip("/"), data=body, headers=headers, **extra
            ) as response:
                status, content = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _async_transport_error(exc, retry_after_s) from None
        return map_reply(status, content, result_model, retry_after_s)

    async def describe(self, model: str) -> DescribeResult:
        return await self.call(
            model,
            DescribeRequest(),
            DescribeResult,
            # a second past the connect timeout: describe is instant on a served model, and
            # a model server still starting its workers holds the connection without answering
            timeout=self.settings.torchserve_connect_timeout_s + 1,
        )

    async def ping(self) -> str | None:
        """``None`` when TorchServe answers healthy, else the reason it is not."""
        try:
            async with self._session.get(
                "ping",
                headers=self.tokens.headers(),
                timeout=_async_timeout(self.settings, self.settings.torchserve_connect_timeout_s + 1),
            ) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return "unreachable"
        if status != 200:
            return f"ping answered {status}"
        return None


class SyncTorchServeClient:
    """Blocking client for the RQ workers (one per job; workers hold no model). Its reads
    wait ``torchserve_job_timeout_s``: a job's call may be long (a whole Explanation Filter)."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self.tokens = TokenSource.from_settings(settings)
        self._client = httpx.Client(
            base_url=settings.torchserve_url,
            timeout=_timeout(settings, settings.torchserve_job_timeout_s),
            transport=transport,
            trust_env=False,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SyncTorchServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, model: str, request: BaseModel, result_model: type[R], attempts: int = 3) -> R:
        """Call the model; transient failures (unreachable, busy) are retried with backoff."""
        body, content_type = encode_request(request)
        delay = 1.0
        for attempt in range(attempts):
            headers = _call_headers(content_type, self.settings.torchserve_job_timeout_s, self.tokens)
            try:
                response = self._client.post(_model_path(model), content=body, headers=headers)
                return map_reply(
                    response.status_code,
                    response.content,
                    result_model,
                    self.settings.torchserve_retry_after_s,
                )
            except httpx.HTTPError as exc:
                error = _transport_error(exc, self.settings.torchserve_retry_after_s)
            except ApiError as exc:
                error = exc
            if error.status not in (503,) or attempt == attempts - 1:
                raise error
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def describe(self, model: str) -> DescribeResult:
        return self.call(model, DescribeRequest(), DescribeResult)

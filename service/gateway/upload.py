"""Request-body size limits enforced while the body streams in (pure ASGI middleware).

A ``Content-Length`` over the limit is refused before a byte is read; a chunked body (no
``Content-Length``) is counted message by message as the app pulls it through ``receive``,
and the chunk that would pass the limit is never handed on, so the multipart parser and
its spooled files never see more than the limit. The client gets a 413 JSON error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes its limit.

    A subclass of Starlette's ``HTTPException`` so FastAPI's body parsing re-raises it as is
    (instead of turning it into a 400) and the error handlers answer 413.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class BodyLimit:
    method: str
    path_prefix: str
    limit: int

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and path.startswith(self.path_prefix)


def _error_message(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class BodyLimitMiddleware:
    """Answer 413 once a request body passes its limit, counting bytes as they arrive."""

    def __init__(
        self,
        app: ASGIApp,
        default_limit: int | Callable[[], int],
        limits: Sequence[BodyLimit] | Callable[[], Sequence[BodyLimit]] = (),
    ) -> None:
        self.app = app
        self._default = default_limit
        self._limits = limits

    def limit_for(self, method: str, path: str) -> int:
        limits = self._limits() if callable(self._limits) else self._limits
        for rule in limits:
            if rule.matches(method, path):
                return rule.limit
        return self._default() if callable(self._default) else self._default

    async def _reply(self, send: Send, status: int, code: str, message: str) -> None:
        body = _error_message(status, code, message)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reply(send, 400, "bad_request", "malformed Content-Length")
                    return
        if declared is not None and declared > limit:
            await self._reply(
                send, 413, "payload_too_large", f"request body exceeds the limit of {limit} bytes"
            )
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await self._reply(send, 413, "payload_too_large", str(exc.detail))

"""The TorchServe pod's auth proxy (``service.torchserve_proxy``) against a recording upstream.

The upstream is an ``httpx.MockTransport`` standing in for the pod's TorchServe: it checks
the pod-local token like TorchServe does and records what reached it, so each test asserts
both what the caller got and what TorchServe saw (or that it saw nothing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from service.settings import Settings
from service.torchserve_proxy import create_app

SHARED = "shared-release-token-0123456789"
LOCAL = "pod-local-inference-key"


def write_key_file(path: Path, inference: str, mtime: float | None = None) -> None:
    path.write_text(json.dumps({"inference": {"key": inference}, "management": {"key": "m"}}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


class FakeTorchServe:
    """Answers like TorchServe 0.12: everything, /ping included, wants the pod-local token."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []
        self.fail: Exception | None = None
        self.ping_status = 200
        self.local_key = LOCAL

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if self.fail is not None:
            raise self.fail
        if request.headers.get("authorization") != f"Bearer {self.local_key}":
            refused = {"code": 400, "type": "InvalidKeyException", "message": "Token failed"}
            return httpx.Response(400, json=refused)
        if request.url.path.endswith("/bad-input"):
            return httpx.Response(400, json={"error": {"code": "invalid_image", "message": "x"}})
        if request.url.path == "/ping":
            return httpx.Response(self.ping_status, json={"status": "Healthy"})
        reply = {"model": request.url.path.rsplit("/", 1)[-1], "echo": request.content.decode()}
        return httpx.Response(200, json=reply, headers={"X-Torchserve-Internal": "1"})


@pytest.fixture
def upstream() -> FakeTorchServe:
    return FakeTorchServe()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key_file.json"
    write_key_file(path, LOCAL)
    return path


@pytest.fixture
def client(upstream: FakeTorchServe, key_file: Path):  # noqa: ANN201 - TestClient
    settings = Settings(
        torchserve_url="http://torchserve.local",
        torchserve_token=SHARED,
        torchserve_key_file=key_file,
        torchserve_retry_after_s=3,
    )
    with TestClient(create_app(settings, httpx.MockTransport(upstream))) as test_client:
        yield test_client


def auth(token: str = SHARED) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def test_prediction_is_forwarded_with_the_pod_local_token(client, upstream) -> None:
    reply = client.post("/predictions/shapes-resnet", content=b'{"task":"predict"}', headers=auth())
    assert reply.status_code == 200
    assert reply.json() == {"model": "shapes-resnet", "echo": '{"task":"predict"}'}
    assert "x-torchserve-internal" not in reply.headers
    (seen,) = upstream.seen
    assert seen.method == "POST" and seen.url.path == "/predictions/shapes-resnet"
    assert seen.headers["authorization"] == f"Bearer {LOCAL}"
    assert seen.headers["content-type"] == "application/json"
    assert SHARED not in str(seen.headers)
    assert "x-beyond-time-limit" not in seen.headers


def test_the_caller_s_time_limit_is_forwarded_and_outwaited(client, upstream) -> None:
    """The handler stops before the caller's wait; the proxy waits for the longest caller."""
    headers = {**auth(), "X-Beyond-Time-Limit": "600", "X-Other": "dropped"}
    assert client.post("/predictions/shapes-resnet", content=b"{}", headers=headers).status_code == 200
    (seen,) = upstream.seen
    assert seen.headers["x-beyond-time-limit"] == "600" and "x-other" not in seen.headers
    proxy = client.app.state.proxy
    assert proxy.client.timeout.read == Settings().torchserve_job_timeout_s + 5


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {LOCAL}"},  # the pod-local token is not accepted from outside
        {"Authorization": f"Basic {SHARED}"},
        {"Authorization": f"Bearer {SHARED}x"},
    ],
)
def test_wrong_or_missing_token_never_reaches_torchserve(client, upstream, headers) -> None:
    reply = client.post("/predictions/shapes-resnet", content=b"{}", headers=headers)
    assert reply.status_code == 401
    assert reply.json()["code"] == 401
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/models"),
        ("POST", "/models?url=evil.mar"),
        ("DELETE", "/models/shapes-resnet"),
        ("PUT", "/token?type=inference"),
        ("GET", "/api-description"),
        ("OPTIONS", "/"),
        ("GET", "/metrics"),
        ("GET", "/predictions/shapes-resnet"),
        ("POST", "/explanations/shapes-resnet"),
        ("POST", "/predictions"),
    ],
)
def test_everything_but_ping_and_predictions_is_closed(client, upstream, method, path) -> None:
    reply = client.request(method, path, headers=auth())
    assert reply.status_code in (404, 405)
    assert upstream.seen == []


@pytest.mark.parametrize(
    "path",
    [
        "/predictions/%2E%2E/models",
        "/predictions/..%2Fmodels/x",
        "/predictions/shapes-resnet%2F..%2F..%2Fmodels",
        "/predictions/-x",
        "/predictions/a%20b",
    ],
)
def test_model_names_cannot_leave_the_predictions_api(client, upstream, path) -> None:
    reply = client.post(path, content=b"{}", headers=auth())
    assert reply.status_code == 404
    assert upstream.seen == []


def test_the_gateway_client_token_is_what_the_proxy_accepts(client, upstream) -> None:
    from service.torchserve_client import TokenSource

    gateway = TokenSource.from_settings(Settings(torchserve_token=SHARED))
    headers = {**gateway.headers(), "Content-Type": "application/json"}
    reply = client.post("/predictions/shapes-vgg/1.0", content=b"{}", headers=headers)
    assert reply.status_code == 200
    assert upstream.seen[-1].url.path == "/predictions/shapes-vgg/1.0"


def test_ping_needs_no_token_and_gets_the_pod_local_one(client, upstream, key_file) -> None:
    reply = client.get("/ping")  # the gateway's readiness check sends none
    assert reply.status_code == 200 and reply.json() == {"status": "Healthy"}
    (seen,) = upstream.seen
    assert seen.headers["authorization"] == f"Bearer {LOCAL}"
    key_file.unlink()
    assert client.get("/ping").status_code == 503
    assert len(upstream.seen) == 1


def test_readiness_needs_the_key_file_and_a_healthy_torchserve(client, upstream, key_file) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    upstream.ping_status = 500
    assert client.get("/readyz").status_code == 503
    upstream.ping_status = 200
    key_file.unlink()
    reply = client.get("/readyz")
    assert reply.status_code == 503 and "token" in reply.json()["reason"]
    assert client.get("/healthz").status_code == 200


def test_no_key_file_yet_answers_503_with_retry_after(client, upstream, key_file) -> None:
    key_file.unlink()
    reply = client.post("/predictions/shapes-resnet", content=b"{}", headers=auth())
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "3"
    assert upstream.seen == []


def test_a_new_key_file_is_picked_up(client, upstream, key_file) -> None:
    assert client.post("/predictions/m", content=b"{}", headers=auth()).status_code == 200
    upstream.local_key = "rotated-pod-local-key"  # TorchServe restarted in the pod
    write_key_file(key_file, upstream.local_key, mtime=key_file.stat().st_mtime + 10)
    assert client.post("/predictions/m", content=b"{}", headers=auth()).status_code == 200
    assert upstream.seen[-1].headers["authorization"] == "Bearer rotated-pod-local-key"


def test_torchserve_refusing_the_pod_token_is_a_503_not_a_401(client, upstream, key_file) -> None:
    write_key_file(key_file, "stale-key", mtime=key_file.stat().st_mtime + 10)
    reply = client.post("/predictions/m", content=b"{}", headers=auth())
    assert reply.status_code == 503
    assert len(upstream.seen) == 1


def test_the_handlers_own_400_passes_through(client, upstream) -> None:
    reply = client.post("/predictions/bad-input", content=b"{}", headers=auth())
    assert reply.status_code == 400
    assert reply.json() == {"error": {"code": "invalid_image", "message": "x"}}


def test_unreachable_and_slow_torchserve(client, upstream) -> None:
    upstream.fail = httpx.ConnectError("refused")
    reply = client.post("/predictions/m", content=b"{}", headers=auth())
    assert reply.status_code == 503 and reply.headers["retry-after"] == "3"
    upstream.fail = httpx.ReadTimeout("slow")
    assert client.post("/predictions/m", content=b"{}", headers=auth()).status_code == 504


def test_oversized_body_is_refused_before_forwarding(upstream, key_file) -> None:
    settings = Settings(torchserve_token=SHARED, torchserve_key_file=key_file)
    app = create_app(settings, httpx.MockTransport(upstream))
    app.state.proxy._max_body = 1024
    with TestClient(app) as small:
        reply = small.post("/predictions/m", content=b"x" * 2048, headers=auth())
        assert reply.status_code == 413
        assert small.post("/predictions/m", content=b"x" * 512, headers=auth()).status_code == 200
    assert len(upstream.seen) == 1


def test_refuses_to_start_without_token_or_key_file(key_file) -> None:
    with pytest.raises(RuntimeError, match="BEYOND_TORCHSERVE_TOKEN"):
        create_app(Settings(torchserve_key_file=key_file))
    with pytest.raises(RuntimeError, match="BEYOND_TORCHSERVE_KEY_FILE"):
        create_app(Settings(torchserve_token=SHARED))

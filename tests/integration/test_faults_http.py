"""Faults an operator meets, on real processes: Redis going away and coming back, the model
server away, and a request that repeats a single-value field.

Its own redis-server, RQ worker and gateway (the gateway's TorchServe URL points at a port
nothing listens on, as while TorchServe restarts), so stopping Redis disturbs no other test.
Before: the job routes answered 500 ``internal_error`` (an unhandled Redis
``ConnectionError``), the worker exited half a second after Redis stopped, a 503
``model_server_unavailable`` carried no ``Retry-After``, and a second ``image`` field was
silently ignored.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis import Redis

from model_store.stack import (
    ManagedProcess,
    RedisServer,
    free_port,
    gateway_process,
    worker_process,
)
from tests.integration.conftest import API_KEY, MODEL, integration_env

pytestmark = pytest.mark.integration


class FaultStack:
    """redis-server, one worker and the gateway; TorchServe deliberately absent."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.redis_port = free_port()
        self.redis = RedisServer(self.redis_port, state)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **integration_env(state, MODEL, self.redis.url, f"http://127.0.0.1:{free_port()}"),
            "BEYOND_TORCHSERVE_TOKEN": "unused-token-of-an-absent-server",
            "BEYOND_WORKER_NAME": "fault-worker",
        }
        self.worker: ManagedProcess = worker_process(self.env, state / "logs" / "worker.log")
        self.gateway: ManagedProcess = gateway_process(
            self.env, "127.0.0.1", self.port, state / "logs" / "gateway.log"
        )

    def start(self) -> None:
        self.redis.start()
        self.worker.start()
        self.gateway.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.gateway.running(), (self.state / "logs" / "gateway.log").read_text()
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the gateway did not start")

    def restart_redis(self) -> None:
        self.redis = RedisServer(self.redis_port, self.state)
        self.redis.start()

    def stop(self) -> None:
        for proc in (self.gateway, self.worker, self.redis):
            proc.stop()

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    stack = FaultStack(tmp_path_factory.mktemp("faults"))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def _workers(url: str) -> list[str]:
    from rq import Worker

    return [worker.name for worker in Worker.all(connection=Redis.from_url(url))]


def test_a_repeated_image_field_is_refused_naming_it(faults: FaultStack) -> None:
    image = _png()
    with faults.client() as client:
        reply = client.post(
            f"/v1/models/{MODEL}/predict",
            files=[("image", ("a.png", image, "image/png")), ("image", ("b.png", image, "image/png"))],
        )
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["code"] == "repeated_field" and "'image'" in error["message"]


def test_the_model_server_away_is_a_503_with_retry_after(faults: FaultStack) -> None:
    with faults.client() as client:
        start = time.monotonic()
        reply = client.post(f"/v1/models/{MODEL}/predict", files={"image": _png()})
        waited = time.monotonic() - start
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "model_server_unavailable"
    assert int(reply.headers["retry-after"]) >= 1
    assert waited < 5  # within the connect timeout, no hang


def test_redis_down_is_a_503_and_the_worker_waits_for_it(faults: FaultStack) -> None:
    assert _workers(faults.redis.url) == ["fault-worker"]
    faults.redis.stop()
    try:
        with faults.client() as client:
            status = client.get("/v1/jobs/0123456789abcdef0123456789abcdef")
            cancel = client.delete("/v1/jobs/0123456789abcdef0123456789abcdef")
            health = client.get("/healthz")
        for reply in (status, cancel):
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "queue_unavailable"
            assert int(reply.headers["retry-after"]) >= 1
        assert health.status_code == 200  # the rest keeps serving
        time.sleep(3)
        assert faults.worker.running(), (faults.state / "logs" / "worker.log").read_text()[-2000:]
        assert faults.gateway.running()
    finally:
        faults.restart_redis()

    deadline = time.monotonic() + 60  # the worker's backoff is at most 30 s
    while time.monotonic() < deadline and _workers(faults.redis.url) != ["fault-worker"]:
        time.sleep(0.5)
    assert _workers(faults.redis.url) == ["fault-worker"]
    with faults.client() as client:
        reply = client.get("/v1/jobs/0123456789abcdef0123456789abcdef")
    assert reply.status_code == 404, reply.text  # the gateway reconnected by itself
    assert faults.worker.running()


def _archive(votes: str | None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(3):
            archive.writestr(f"circle/{i}.png", _png())
        if votes is not None:
            archive.writestr("metadata.csv", "file,class_name,yes\n" + votes)
    return out.getvalue()


def test_an_upload_with_new_metadata_never_replaces_an_earlier_dataset(faults: FaultStack) -> None:
    def upload(data: bytes) -> str:
        reply = client.post("/v1/datasets", files={"archive": ("d.zip", data, "application/zip")})
        assert reply.status_code == 201, reply.text
        return reply.json()["dataset_id"]

    with faults.client() as client:
        plain = upload(_archive(None))
        first = upload(_archive("circle/0.png,star,5\n"))
        second = upload(_archive("circle/0.png,square,5\n"))
        again = upload(_archive("circle/0.png,star,5\n"))
        assert len({plain, first, second}) == 3 and again == first
        assert client.get(f"/v1/datasets/{first}").json()["has_metadata"] is True
        assert client.get(f"/v1/datasets/{plain}").json()["has_metadata"] is False
    manifest = json.loads((faults.state / "data" / "datasets" / f"{first}.json").read_text())
    assert manifest["metadata"] == [{"file": "circle/0.png", "class_name": "star", "yes": "5"}]

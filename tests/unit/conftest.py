"""Unit-test fixtures: a real redis-server and the fake TorchServe on free ports."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from redis import Redis

from model_store.stack import RedisServer, free_port
from service.gateway.app import create_app
from service.settings import Settings
from tests.unit import fake_torchserve

API_KEY = "unit-test-key-0123456789"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_ts_url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(fake_torchserve.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/ping", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def settings(tmp_path: Path, redis_server: RedisServer, fake_ts_url: str) -> Settings:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": fake_torchserve.TOKEN}}))
    return Settings(
        api_keys=API_KEY,
        state_dir=tmp_path,
        redis_url=redis_server.url,
        torchserve_url=fake_ts_url,
        torchserve_key_file=key_file,
        models="shapes-resnet,shapes-vgg",
        queue_name=f"q-{tmp_path.name}",
        torchserve_timeout_s=2,
        max_upload_bytes=200_000,
        max_archive_bytes=2_000_000,
        max_image_pixels=1_000_000,
        job_retries=0,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    fake_torchserve.State.mode = "ok"
    fake_torchserve.State.requests.clear()
    fake_torchserve.State.images.clear()
    fake_torchserve.State.time_limits.clear()
    fake_torchserve.State.filter_calls_out_of_time = 0
    fake_torchserve.State.filter_values_removed = 2
    fake_torchserve.State.most_images = None
    with TestClient(
        create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"}
    ) as test_client:
        yield test_client
    fake_torchserve.State.mode = "ok"


@pytest.fixture
def redis(settings: Settings) -> Iterator[Redis]:
    conn = Redis.from_url(settings.redis_url)
    yield conn
    conn.close()

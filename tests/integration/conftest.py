"""Integration fixtures: real redis-server, TorchServe on the demo archive, an RQ worker and
the gateway, on free ports under a temporary state folder; every process is stopped at the end.

Worker timings are shortened (heartbeat 1 s + 3 s grace, maintenance every 3 s, one retry
after 1 s) so the fault tests finish in seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model_store.stack import (
    ManagedProcess,
    RedisServer,
    free_port,
    gateway_process,
    wait_ready,
    worker_process,
)
from service.settings import Settings

API_KEY = "integration-key-0123456789abcdef"
MODEL = "shapes-resnet"
REPO = Path(__file__).resolve().parents[2]


def integration_env(state: Path, models: str, redis_url: str, torchserve_url: str) -> dict[str, str]:
    """The environment of a gateway or worker the integration tests start: this project on
    the path, the tests' API key, and where its state, Redis and TorchServe are."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "BEYOND_API_KEYS": API_KEY,
        "BEYOND_STATE_DIR": str(state),
        "BEYOND_MODELS": models,
        "BEYOND_REDIS_URL": redis_url,
        "BEYOND_TORCHSERVE_URL": torchserve_url,
    }


class Stack:
    def __init__(self, state: Path) -> None:
        from model_store.build import ensure_demo_archives
        from model_store.torchserve_process import TorchServeProcess

        self.state = state
        self.redis = RedisServer(free_port(), state)
        self.ts = TorchServeProcess(
            ensure_demo_archives(),
            [f"{MODEL}.mar"],
            state / "torchserve",
            free_port(),
            free_port(),
            free_port(),
        )
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **integration_env(state, MODEL, self.redis.url, self.ts.inference_url),
            "BEYOND_TORCHSERVE_KEY_FILE": str(self.ts.key_file),
            "BEYOND_TORCHSERVE_TIMEOUT_S": "60",
            "BEYOND_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
            "BEYOND_MAX_ARCHIVE_BYTES": str(8 * 1024 * 1024),
            "BEYOND_WORKER_MONITOR_INTERVAL_S": "1",
            "BEYOND_WORKER_HEARTBEAT_GRACE_S": "3",
            "BEYOND_WORKER_MAINTENANCE_INTERVAL_S": "3",
            "BEYOND_WORKER_TTL_S": "20",
            "BEYOND_JOB_RETRIES": "1",
            "BEYOND_JOB_RETRY_INTERVALS_S": "1",
            "BEYOND_EMBED_BATCH_SIZE": "8",
        }
        self.settings = Settings(
            api_keys=API_KEY,
            state_dir=state,
            models=MODEL,
            redis_url=self.redis.url,
            torchserve_url=self.ts.inference_url,
            torchserve_key_file=self.ts.key_file,
            job_retries=1,
            job_retry_intervals_s="1",
        )
        self.worker: ManagedProcess | None = None
        self.gateway: ManagedProcess | None = None

    def start(self) -> None:
        self.redis.start()
        self.ts.start(timeout=600)
        self.start_worker()
        self.gateway = gateway_process(
            self.env, "127.0.0.1", self.port, self.state / "logs" / "gateway.log"
        )
        self.gateway.start()
        wait_ready(self.base_url, 120, check=self.gateway)

    def start_worker(self) -> None:
        self.worker = worker_process(self.env, self.state / "logs" / "worker.log")
        self.worker.cwd = REPO
        self.worker.start()
        time.sleep(1.5)

    def stop(self) -> None:
        for proc in (self.gateway, self.worker):
            if proc is not None:
                proc.stop()
        self.ts.stop()
        self.redis.stop()

    def client(self, key: str | None = API_KEY, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("stack"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def api(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client

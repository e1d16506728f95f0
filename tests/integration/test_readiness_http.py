"""Ready means ready, on real processes: the gateway starts before TorchServe, TorchServe
starts and later restarts, and throughout ``/readyz`` is green only when every configured
model answers, and a prediction is answered at once: 200 when ready, else 200 or 503 with
``Retry-After`` (never a hang, a 404 or a 500).

Before, ``/readyz`` turned green as soon as TorchServe's port opened, while its models were
still loading (28-58 s on two cores), and predictions then hung or answered 404.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from model_store.stack import ManagedProcess, RedisServer, free_port, gateway_process
from model_store.torchserve_process import TorchServeProcess
from tests.integration.conftest import API_KEY, MODEL, integration_env

pytestmark = pytest.mark.integration
MODELS = (MODEL, "shapes-vgg")  # two models: TorchServe registers them one at a time


class LateStack:
    def __init__(self, state: Path) -> None:
        from model_store.build import ensure_demo_archives

        self.redis = RedisServer(free_port(), state)
        self.ts = TorchServeProcess(
            ensure_demo_archives(), [f"{m}.mar" for m in MODELS], state / "torchserve", free_port(), free_port(), free_port()
        )
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        env = {
            **integration_env(state, ",".join(MODELS), self.redis.url, self.ts.inference_url),
            "BEYOND_TORCHSERVE_KEY_FILE": str(self.ts.key_file),
        }
        self.gateway: ManagedProcess = gateway_process(env, "127.0.0.1", port, state / "logs" / "gateway.log")


@pytest.fixture(scope="module")
def late(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LateStack]:
    stack = LateStack(tmp_path_factory.mktemp("late"))
    stack.redis.start()
    stack.gateway.start()
    try:
        yield stack
    finally:
        stack.gateway.stop()
        stack.ts.stop()
        stack.redis.stop()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def _watch_until_ready(late: LateStack, timeout: float) -> list[tuple[int, int, str | None, float]]:
    """Poll readiness and a prediction until ready: (readyz, predict, Retry-After, seconds)."""
    seen = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=late.base_url, headers=headers, timeout=30) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready = client.get("/readyz").status_code
            except httpx.TransportError:  # the gateway itself still starting
                time.sleep(0.3)
                continue
            start = time.monotonic()
            reply = client.post(f"/v1/models/{MODEL}/predict", files={"image": _png()})
            seen.append((ready, reply.status_code, reply.headers.get("retry-after"), time.monotonic() - start))
            if ready == 200:
                return seen
            time.sleep(0.3)
    raise AssertionError(f"not ready within {timeout} s: {seen[-3:]}")


def _check(seen: list[tuple[int, int, str | None, float]]) -> None:
    for ready, predict, retry_after, seconds in seen:
        assert seconds < 6, seen  # answered at once, never hung
        if ready == 200:
            assert predict == 200, seen
        else:  # this model may answer before the other has loaded; if not, a clean 503
            assert ready == 503 and predict in (200, 503), seen
            assert predict == 200 or retry_after is not None, seen
    assert seen[0][0] == 503 and seen[-1][0] == 200


def test_ready_only_once_the_model_answers_across_a_start_and_a_restart(late: LateStack) -> None:
    late.ts.launch(late.ts.log_file)  # the model loads from here on
    _check(_watch_until_ready(late, 300))

    late.ts.stop()
    late.ts.launch(late.ts.log_file)
    _check(_watch_until_ready(late, 300))

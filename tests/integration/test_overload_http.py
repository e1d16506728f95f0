"""Overload over real HTTP: a flood gets fast 429s with Retry-After, and the gateway recovers.

A second gateway with a tight predict bound (4 in flight) runs beside the session's stack,
on the same TorchServe, so the flood is sure to pass the bound whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from model_store.stack import ManagedProcess, free_port, gateway_process, wait_ready
from tests.integration.conftest import API_KEY, MODEL, Stack

pytestmark = pytest.mark.integration
BOUND = 4
CLIENTS = 24
ROUNDS = 4


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 120, 200)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def tight_gateway(stack: Stack) -> Iterator[str]:
    port = free_port()
    env = {**stack.env, "BEYOND_MAX_INFLIGHT_PREDICT": str(BOUND)}
    env["BEYOND_OVERLOAD_RETRY_AFTER_S"] = "2"
    gateway: ManagedProcess = gateway_process(
        env, "127.0.0.1", port, stack.state / "logs" / "gateway-tight.log"
    )
    gateway.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, 60, check=gateway)
        yield base
    finally:
        gateway.stop()


async def _flood(base: str, image: bytes) -> list[tuple[int, float, str | None]]:
    """CLIENTS concurrent clients, ROUNDS predictions each, no pause: (status, s, Retry-After)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=CLIENTS)
    results: list[tuple[int, float, str | None]] = []
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=60, limits=limits
    ) as client:

        async def one_client() -> None:
            for _ in range(ROUNDS):
                start = time.perf_counter()
                reply = await client.post(
                    f"/v1/models/{MODEL}/predict",
                    files={"image": ("x.png", image, "image/png")},
                )
                elapsed = time.perf_counter() - start
                results.append((reply.status_code, elapsed, reply.headers.get("retry-after")))

        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return results


def test_flood_gets_fast_429_and_recovers(tight_gateway: str) -> None:
    image = _png()
    with httpx.Client(base_url=tight_gateway, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert c.post(f"/v1/models/{MODEL}/predict", files={"image": image}).status_code == 200

    results = asyncio.run(_flood(tight_gateway, image))
    statuses = [status for status, _, _ in results]
    assert len(results) == CLIENTS * ROUNDS
    assert set(statuses) <= {200, 429}, statuses  # no timeouts, no 5xx
    refused = [(elapsed, retry) for status, elapsed, retry in results if status == 429]
    served = [elapsed for status, elapsed, _ in results if status == 200]
    assert refused, "the flood never passed the bound"
    assert served, "nothing was served during the flood"
    assert all(retry == "2" for _, retry in refused)
    refused_s = sorted(elapsed for elapsed, _ in refused)
    # refused before the body is decoded or TorchServe is asked: far below a prediction
    assert refused_s[len(refused_s) // 2] < 0.25, refused_s

    with httpx.Client(
        base_url=tight_gateway, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as c:
        # recovered: sequential requests (below the bound) are all served
        after = [
            c.post(f"/v1/models/{MODEL}/predict", files={"image": image}).status_code
            for _ in range(5)
        ]
        assert after == [200] * 5
        metrics = c.get("/metrics").text
    assert 'beyond_admission_rejected_total{route_class="predict"}' in metrics
    assert 'beyond_inflight_requests{route_class="predict"} 0.0' in metrics

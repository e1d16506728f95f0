"""Work past a call's time limit stops with a 422, and the handler goes on serving."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from handlers.deadline import TimeLimitExceeded, check_time, time_limit
from handlers.metrics.apem import apem
from handlers.torchserve_handler import BeyondHandler, caller_time_limit, work_time_limit
from model_store.build import DEFAULT_MODEL_CONFIG
from service.settings import Settings
from service.torchserve_client import SyncTorchServeClient
from tests.unit.adversarial_helpers import images, tiny_cnn
from tests.unit.torchserve_context import FakeContext, tiny_model_dir


def test_check_time_raises_only_past_the_innermost_deadline() -> None:
    check_time("nothing")  # no limit: never raises
    with time_limit(None):
        check_time("nothing")
    with time_limit(60.0):
        check_time("work")
        with time_limit(0.0), pytest.raises(TimeLimitExceeded, match="work did not finish within the 0 s"):
            time.sleep(0.001)
            check_time("work")
        check_time("work")  # the outer limit again
    with time_limit(0.0), time_limit(60.0), pytest.raises(TimeLimitExceeded):  # an inner limit never extends
        time.sleep(0.001)
        check_time("work")


@pytest.mark.parametrize(("timeout", "expected"), [(600, 540.0), (120, 108.0), (None, 108.0), (30, 25.0), (3000, 2940.0), (2, 1.0)])
def test_work_limit_leaves_a_margin_inside_the_response_timeout(timeout: int | None, expected: float) -> None:
    assert work_time_limit(timeout) == expected


def test_an_apem_search_stops_at_the_limit() -> None:
    model = tiny_cnn(dtype=torch.float32)
    x = images(1, dtype=torch.float32)
    relevance = torch.rand(1, 1, 8, 8)
    grid = {"step": 1e-9, "max_steps": 100_000, "search": "sequential"}  # never flips: every point evaluated
    start = time.monotonic()
    with time_limit(0.2), pytest.raises(TimeLimitExceeded, match="flip search"):
        apem(model, x, relevance, params=grid)
    assert time.monotonic() - start < 2.0


def _png(size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.fromarray((torch.rand(size, size, 3) * 255).byte().numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"X-Beyond-Time-Limit": "120"}, 114.0),
        ({"x-beyond-time-limit": "10"}, 8.0),
        ({"X-BEYOND-TIME-LIMIT": "2"}, 0.5),
        ({"X-Beyond-Time-Limit": "soon"}, None),
        ({"X-Beyond-Time-Limit": "-3"}, None),
        ({"X-Beyond-Time-Limit": "nan"}, None),
        ({"X-Beyond-Time-Limit": "inf"}, None),
    ],
)
def test_the_caller_s_wait_bounds_the_work(headers: dict[str, str], expected: float | None) -> None:
    context = FakeContext()
    context.headers = headers
    assert caller_time_limit(context, 0) == expected
    assert caller_time_limit(object(), 0) is None  # a context without request headers


def _call(handler: BeyondHandler, context: FakeContext, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    context.status.clear()
    (reply,) = handler.handle([{"body": json.dumps(body).encode()}], context)
    return context.status.get(0, 200), json.loads(reply)


def _never_flipping_apem(image: str) -> dict[str, Any]:
    """An APEM request that would take 200,000 passes: steps too small to flip anything."""
    grid = {"step": 1e-9, "max_steps": 100_000, "search": "sequential"}
    return {"task": "apem", "image": image, "method": "gradient", "apem_params": grid}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return tiny_model_dir(tmp_path)


def test_the_handler_answers_422_time_limit_and_keeps_serving(model_dir: Path) -> None:
    context = FakeContext(model_dir, response_timeout=2)  # 1 s of work per call
    handler = BeyondHandler()
    handler.initialize(context)
    assert handler.time_limit_s == 1.0
    image = _png()
    start = time.monotonic()
    status, body = _call(handler, context, _never_flipping_apem(image))
    assert time.monotonic() - start < 5.0
    assert status == 422 and body["error"]["code"] == "time_limit"
    assert "1 s this call may work" in body["error"]["message"] and "max_steps" in body["error"]["message"]
    status, body = _call(handler, context, {"task": "predict", "image": image})
    assert status == 200 and len(body["predictions"]) >= 1


def test_a_call_stops_before_its_caller_gives_up(model_dir: Path) -> None:
    """Under a long responseTimeout, a caller that waits 3 s gets its 422 after about 1 s."""
    context = FakeContext(model_dir, response_timeout=600)
    handler = BeyondHandler()
    handler.initialize(context)
    context.headers = {"X-Beyond-Time-Limit": "3"}
    start = time.monotonic()
    status, body = _call(handler, context, _never_flipping_apem(_png()))
    assert 1.0 <= time.monotonic() - start < 3.0
    assert status == 422 and body["error"]["code"] == "time_limit" and " 1 s " in body["error"]["message"]


def test_a_job_s_call_outwaits_the_handler_s_time_limit(tmp_path: Path) -> None:
    """The archives' responseTimeout, the handler's limit inside it and the jobs' read timeout
    agree: a long job call is answered (422 time_limit at worst), not cut off with a 504."""
    settings = Settings(state_dir=tmp_path)
    assert settings.torchserve_job_timeout_s == DEFAULT_MODEL_CONFIG["responseTimeout"]
    assert work_time_limit(DEFAULT_MODEL_CONFIG["responseTimeout"]) < settings.torchserve_job_timeout_s
    with SyncTorchServeClient(settings) as client:
        assert client._client.timeout.read == settings.torchserve_job_timeout_s > settings.torchserve_timeout_s

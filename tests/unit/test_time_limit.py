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
from handlers.spec import ModelSpec, Preprocessing
from handlers.torchserve_handler import BeyondHandler, work_time_limit
from model_store.build import DEFAULT_MODEL_CONFIG
from service.settings import Settings
from service.torchserve_client import SyncTorchServeClient
from tests.unit.adversarial_helpers import images, tiny_cnn


def test_check_time_raises_only_past_the_innermost_deadline() -> None:
    check_time("nothing")  # no limit: never raises
    with time_limit(None):
        check_time("nothing")
    with time_limit(60.0):
        check_time("work")
        with time_limit(0.0), pytest.raises(TimeLimitExceeded, match="work did not finish within .* 0 s"):
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


class _Context:
    """What BeyondHandler uses of TorchServe's context."""

    def __init__(self, model_dir: Path, response_timeout: int) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = {"minWorkers": 1, "responseTimeout": response_timeout}
        self.status: dict[int, int] = {}

    def set_response_header(self, index: int, name: str, value: str) -> None:
        pass

    def set_response_status(self, code: int, phrase: str, index: int) -> None:
        self.status[index] = code


def _png(size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.fromarray((torch.rand(size, size, 3) * 255).byte().numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _call(handler: BeyondHandler, context: _Context, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    context.status.clear()
    (reply,) = handler.handle([{"body": json.dumps(body).encode()}], context)
    return context.status.get(0, 200), json.loads(reply)


def test_the_handler_answers_422_time_limit_and_keeps_serving(tmp_path: Path) -> None:
    spec = ModelSpec(
        name="tiny", architecture="shapes_resnet", num_classes=6, random_weights=True,
        preprocessing=Preprocessing(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        labels=[f"c{i}" for i in range(6)],
    )
    (tmp_path / "model_spec.json").write_text(spec.model_dump_json())
    context = _Context(tmp_path, response_timeout=2)  # 1 s of work per call
    handler = BeyondHandler()
    handler.initialize(context)
    assert handler.time_limit_s == 1.0
    image = _png()
    slow = {
        "task": "apem", "image": image, "method": "gradient",
        "apem_params": {"step": 1e-9, "max_steps": 100_000, "search": "sequential"},
    }
    start = time.monotonic()
    status, body = _call(handler, context, slow)
    assert time.monotonic() - start < 5.0
    assert status == 422 and body["error"]["code"] == "time_limit"
    assert "1 s per call" in body["error"]["message"] and "max_steps" in body["error"]["message"]
    status, body = _call(handler, context, {"task": "predict", "image": image})
    assert status == 200 and len(body["predictions"]) >= 1


def test_a_job_s_call_outwaits_the_handler_s_time_limit(tmp_path: Path) -> None:
    """The archives' responseTimeout, the handler's limit inside it and the jobs' read timeout
    agree: a long job call is answered (422 time_limit at worst), not cut off with a 504."""
    settings = Settings(state_dir=tmp_path)
    assert settings.torchserve_job_timeout_s == DEFAULT_MODEL_CONFIG["responseTimeout"]
    assert work_time_limit(DEFAULT_MODEL_CONFIG["responseTimeout"]) < settings.torchserve_job_timeout_s
    with SyncTorchServeClient(settings) as client:
        assert client._client.timeout.read == settings.torchserve_job_timeout_s > settings.torchserve_timeout_s

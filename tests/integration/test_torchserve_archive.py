"""A built demo archive loads in a real TorchServe and answers with our handler."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import time

import httpx
import pytest
from PIL import Image

from model_store.torchserve_process import TorchServeProcess
from protocol.contract import TIME_LIMIT_HEADER, PredictRequest, RawImage
from protocol.frames import encode_request

pytestmark = pytest.mark.integration


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory):
    from model_store.build import ensure_demo_archives

    store = ensure_demo_archives()
    ports = _free_ports(3)
    server = TorchServeProcess(store, ["shapes-resnet.mar"], tmp_path_factory.mktemp("ts"), *ports)
    server.start(timeout=240)
    yield server
    server.stop()


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_archive_predicts_the_drawn_shape(torchserve: TorchServeProcess, shapes_split) -> None:
    split = shapes_split("spurious", "test")
    headers = {"Authorization": f"Bearer {torchserve.inference_token()}"}
    correct = 0
    for i in range(12):
        body = {"task": "predict", "image": _png_b64(split.images[i]), "top_k": 2}
        reply = httpx.post(f"{torchserve.inference_url}/predictions/shapes-resnet", json=body, headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
        payload = reply.json()
        assert payload["model"] == "shapes-resnet" and len(payload["predictions"]) == 2
        top = payload["predictions"][0]
        assert top["label"] == split.class_names[top["class_index"]]
        correct += top["class_index"] == split.labels[i]
    assert correct >= 11


def test_archive_carries_spec_and_refuses_bad_requests(torchserve: TorchServeProcess) -> None:
    headers = {"Authorization": f"Bearer {torchserve.inference_token()}"}
    url = f"{torchserve.inference_url}/predictions/shapes-resnet"
    spec = httpx.post(url, json={"task": "describe"}, headers=headers, timeout=30).json()["spec"]
    assert spec["labels"] == ["circle", "square", "triangle", "star", "cross", "ring"]
    assert spec["preprocessing"]["crop"] == 64 and spec["metrics"]["test_accuracy"] >= 0.95
    bad = httpx.post(url, json={"task": "predict", "image": "not base64!"}, headers=headers, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_image"
    unknown = httpx.post(url, json={"task": "teleport"}, headers=headers, timeout=30)
    assert unknown.status_code == 422
    # the worker survived both
    ok = httpx.post(url, json={"task": "describe"}, headers=headers, timeout=30)
    assert ok.status_code == 200


def test_frames_give_the_json_answer_and_bad_frames_a_reason(
    torchserve: TorchServeProcess, shapes_split
) -> None:
    split = shapes_split("spurious", "test")
    headers = {"Authorization": f"Bearer {torchserve.inference_token()}"}
    url = f"{torchserve.inference_url}/predictions/shapes-resnet"

    def post(body: bytes, content_type: str) -> httpx.Response:
        return httpx.post(url, content=body, headers={**headers, "Content-Type": content_type}, timeout=60)

    for i in range(3):
        pixels = split.images[i]
        raw = RawImage(width=pixels.shape[1], height=pixels.shape[0], pixels=pixels.tobytes())
        framed = post(*encode_request(PredictRequest(image=raw, top_k=6)))
        as_json = post(*encode_request(PredictRequest(image=_png_b64(pixels), top_k=6)))
        assert framed.status_code == as_json.status_code == 200, framed.text
        assert framed.json()["predictions"] == as_json.json()["predictions"]
    body, content_type = encode_request(PredictRequest(image=raw, top_k=1))
    truncated = post(body[:-1], content_type)
    assert truncated.status_code == 400 and truncated.json()["error"]["code"] == "invalid_frame"
    short = RawImage(width=raw.width + 1, height=raw.height, pixels=raw.pixels)
    wrong_size = post(*encode_request(PredictRequest(image=short, top_k=1)))
    assert wrong_size.status_code == 422 and "width x height" in wrong_size.json()["error"]["message"]
    assert post(*encode_request(PredictRequest(image=raw, top_k=1))).status_code == 200


def test_torchserve_is_closed(torchserve: TorchServeProcess) -> None:
    url = f"{torchserve.inference_url}/predictions/shapes-resnet"
    assert httpx.post(url, json={"task": "describe"}, timeout=30).status_code in (400, 401)
    management = {"Authorization": f"Bearer {torchserve.management_token()}"}
    register = httpx.post(f"{torchserve.management_url}/models?url=http://example.invalid/x.mar", headers=management, timeout=30)
    assert register.status_code >= 400
    assert "127.0.0.1" in torchserve.inference_url and "127.0.0.1" in torchserve.management_url



@pytest.fixture(scope="module")
def short_timeout_torchserve(tmp_path_factory: pytest.TempPathFactory):
    """The demo shapes-resnet archived with an 8 s ``responseTimeout``: 3 s of work per call."""
    from handlers.models.classifier import SPEC_FILE, WEIGHTS_FILE
    from model_store import paths
    from model_store.build import archive, ensure_demo_archives, model_config
    from protocol.spec import ModelSpec

    ensure_demo_archives()
    demo = paths.DEMO_WEIGHTS_DIR / "shapes-resnet"
    model_dir = tmp_path_factory.mktemp("model") / "short-timeout"
    model_dir.mkdir()
    spec = ModelSpec.model_validate_json((demo / SPEC_FILE).read_text()).model_copy(update={"name": "short-timeout"})
    (model_dir / SPEC_FILE).write_text(spec.model_dump_json())
    shutil.copy(demo / WEIGHTS_FILE, model_dir / WEIGHTS_FILE)
    store = tmp_path_factory.mktemp("store")
    archive(model_dir, store, model_config(minWorkers=1, maxWorkers=1, batchSize=1, responseTimeout=8))
    server = TorchServeProcess(store, ["short-timeout.mar"], tmp_path_factory.mktemp("ts"), *_free_ports(3))
    server.start(timeout=240)
    yield server
    server.stop()


def test_work_past_the_response_timeout_is_refused_and_the_worker_keeps_serving(
    short_timeout_torchserve: TorchServeProcess, shapes_split
) -> None:
    """Without the handler's limit TorchServe would kill the worker at 8 s (and fail the call
    with a 5xx); with it the call is a 422 naming what to change and the worker answers on."""
    server = short_timeout_torchserve
    headers = {"Authorization": f"Bearer {server.inference_token()}"}
    url = f"{server.inference_url}/predictions/short-timeout"
    image = _png_b64(shapes_split("spurious", "test").images[0])
    never_flips = {"step": 1e-9, "max_steps": 100_000, "search": "sequential"}  # 200,000 passes
    start = time.monotonic()
    slow = httpx.post(
        url, json={"task": "apem", "image": image, "method": "gradient", "apem_params": never_flips},
        headers=headers, timeout=60,
    )
    elapsed = time.monotonic() - start
    assert slow.status_code == 422, slow.text
    error = slow.json()["error"]
    assert error["code"] == "time_limit" and "3 s this call may work" in error["message"] and "max_steps" in error["message"]
    assert 3.0 <= elapsed < 8.0
    quick = httpx.post(url, json={"task": "predict", "image": image}, headers=headers, timeout=30)
    assert quick.status_code == 200 and len(quick.json()["predictions"]) >= 1
    # a caller that waits 3 s (TorchServe passes the header on): 1 s of work
    start = time.monotonic()
    impatient = httpx.post(
        url, json={"task": "apem", "image": image, "method": "gradient", "apem_params": never_flips},
        headers={**headers, TIME_LIMIT_HEADER: "3"}, timeout=60,
    )
    assert impatient.status_code == 422 and "1 s this call may work" in impatient.json()["error"]["message"]
    assert 1.0 <= time.monotonic() - start < 3.0


def test_a_filter_out_of_time_returns_the_map_it_reached_and_goes_on_from_it(
    short_timeout_torchserve: TorchServeProcess, shapes_split
) -> None:
    """Every distinct value of a 64x64 map takes minutes; in 3 s of work the handler returns
    the state Algorithm 2 had reached, and a call with that map continues it."""
    server = short_timeout_torchserve
    headers = {"Authorization": f"Bearer {server.inference_token()}"}
    url = f"{server.inference_url}/predictions/short-timeout"
    image = _png_b64(shapes_split("spurious", "test").images[0])
    common = {"task": "filter", "image": image, "filter_params": {"levels": None}}
    start = time.monotonic()
    first = httpx.post(url, json={**common, "method": "gradient"}, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    assert time.monotonic() - start < 8.0
    reached = first.json()
    assert reached["stop"] == "time_limit" and reached["values_removed"] >= 1
    assert reached["distinct_values"] > reached["values_removed"] and reached["apem_after"] >= reached["apem_before"]
    resumed = httpx.post(
        url, json={**common, "relevance": reached["filtered"], "target": reached["target"]}, headers=headers, timeout=60
    )
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["apem_before"] == reached["apem_after"]  # the same state, scored again
    assert resumed.json()["distinct_values"] == reached["distinct_values"] - reached["values_removed"]

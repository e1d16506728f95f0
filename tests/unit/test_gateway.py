"""Gateway behaviour against the fake TorchServe and a real Redis (in-process client)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.unit import fake_torchserve
from tests.unit.conftest import API_KEY


def png(size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format="PNG")
    return out.getvalue()


def files(data: bytes | None = None) -> dict:
    return {"image": ("x.png", data if data is not None else png(), "image/png")}


def assert_error(reply, status: int, code: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code
    assert "Traceback" not in reply.text
    return body


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {
        "torchserve": "ok",
        "redis": "ok",
    }


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic abc", "Bearer "])
def test_auth_required(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    client.headers.pop("Authorization")
    reply = client.get("/v1/models", headers=headers)
    assert_error(reply, 401, "unauthorized")
    assert reply.headers["www-authenticate"] == "Bearer"
    assert API_KEY not in reply.text


def test_models(client: TestClient) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["shapes-resnet", "shapes-vgg"]
    assert {"name", "version", "num_classes", "input_size"} <= set(models[0])
    detail = client.get("/v1/models/shapes-resnet").json()
    assert detail["labels"] == fake_torchserve.LABELS and detail["input_size"] == 64
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found")


def test_predict_sends_decoded_rgb_pixels_in_a_frame(client: TestClient) -> None:
    reply = client.post(
        "/v1/models/shapes-resnet/predict?top_k=2", files=files(png((5, 4), "RGBA"))
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "shapes-resnet" and len(body["predictions"]) == 2
    assert fake_torchserve.State.requests[-1]["image"] == {"width": 5, "height": 4, "part": 0}
    (sent,) = fake_torchserve.State.images
    pixels = np.frombuffer(sent.pixels, dtype=np.uint8).reshape(4, 5, 3)
    assert (pixels == 255).all()  # transparent black, composited on white


def test_explain_attack_apem(client: TestClient) -> None:
    reply = client.post(
        "/v1/models/shapes-resnet/explain",
        files=files(),
        data={"method": "gradient", "target": "1", "params": '{"a": 1}', "score": "apem"},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["relevance"]["encoding"] == "npy-base64" and body["method"] == "gradient"
    assert fake_torchserve.State.requests[-1]["score"] == "apem"
    reply = client.post(
        "/v1/models/shapes-resnet/attack",
        files=files(),
        data={"method": "pgd", "params": json.dumps({"epsilon": 0.03, "steps": 5})},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["steps_to_flip"] == 3
    npy = io.BytesIO()
    np.save(npy, np.ones((8, 8), dtype=np.float64))
    reply = client.post(
        "/v1/models/shapes-resnet/apem",
        files={**files(), "relevance": ("r.npy", npy.getvalue(), "application/octet-stream")},
    )
    assert reply.status_code == 200, reply.text
    assert fake_torchserve.State.requests[-1]["relevance"]["shape"] == [8, 8]


def test_attack_forwards_only_the_parameters_the_client_set(client: TestClient) -> None:
    """Unset parameters take the method's own defaults in the handler (FGSM has no steps)."""
    url = "/v1/models/shapes-resnet/attack"
    reply = client.post(url, files=files(), data={"method": "fgsm"})
    assert reply.status_code == 200, reply.text
    assert fake_torchserve.State.requests[-1]["params"] == {}
    reply = client.post(url, files=files(), data={"method": "pgd", "params": '{"epsilon": 0.02, "norm": "l2"}'})
    assert reply.status_code == 200, reply.text
    assert fake_torchserve.State.requests[-1]["params"] == {"epsilon": 0.02, "norm": "l2"}


def test_apem_parameters_reach_the_handler_and_come_back(client: TestClient) -> None:
    """APEM's grid, search and APEM_norm are the client's to set on /apem and /explain."""
    apem_params = {"max_steps": 300, "normalise": True}
    reply = client.post(
        "/v1/models/shapes-resnet/apem",
        files=files(),
        data={"method": "gradient", "params": '{"a": 1}', "apem_params": json.dumps(apem_params)},
    )
    assert reply.status_code == 200, reply.text
    sent = fake_torchserve.State.requests[-1]
    assert sent["apem_params"] == apem_params and sent["params"] == {"a": 1}
    body = reply.json()
    assert body["params"] == {"max_steps": 300, "normalise": True}
    assert body["method_params"] == {"a": 1}
    reply = client.post(
        "/v1/models/shapes-resnet/explain",
        files=files(),
        data={"method": "gradient", "score": "apem", "apem_params": '{"search": "approximate"}'},
    )
    assert reply.status_code == 200, reply.text
    assert fake_torchserve.State.requests[-1]["apem_params"] == {"search": "approximate"}


def test_explain_outputs_and_colormap_are_forwarded(client: TestClient) -> None:
    url = "/v1/models/shapes-resnet/explain"
    reply = client.post(url, files=files(), data={"method": "gradient"})
    assert reply.status_code == 200, reply.text
    sent = fake_torchserve.State.requests[-1]
    assert sent["outputs"] == ["relevance", "heatmap_png", "overlay_png"]
    assert sent["colormap"] == "inferno"
    data = {"method": "gradient", "outputs": "attention_png, relevance,relevance", "colormap": "gray"}
    reply = client.post(url, files=files(), data=data)
    assert reply.status_code == 200, reply.text
    sent = fake_torchserve.State.requests[-1]
    assert sent["outputs"] == ["attention_png", "relevance"] and sent["colormap"] == "gray"
    body = assert_error(
        client.post(url, files=files(), data={"method": "gradient", "outputs": "relevance,png"}),
        422,
        "invalid_request",
    )
    assert "'png'" in body["error"]["message"] and "path_png" in body["error"]["message"]


def test_attack_explains_the_adversarial_image_when_asked(client: TestClient) -> None:
    url = "/v1/models/shapes-resnet/attack"
    reply = client.post(url, files=files(), data={"method": "ifgsm"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["explanation"] is None and body["adversarial_array"] is None
    assert body["png_prediction"]["class_index"] == 0
    sent = fake_torchserve.State.requests[-1]
    assert sent["explanation"] is None and sent["adversarial_array"] is False
    reply = client.post(
        url,
        files=files(),
        data={
            "method": "ifgsm",
            "explain": "smoothgrad",
            "explain_params": '{"n": 5}',
            "adversarial_array": "true",
        },
    )
    assert reply.status_code == 200, reply.text
    sent = fake_torchserve.State.requests[-1]
    assert sent["explanation"]["method"] == "smoothgrad" and sent["explanation"]["params"] == {"n": 5}
    assert sent["explanation"]["target"] is None  # the handler explains the adversarial class
    body = reply.json()
    assert body["explanation"]["method"] == "smoothgrad"
    assert body["explanation"]["relevance"]["encoding"] == "npy-base64"
    assert body["adversarial_array"]["shape"] == [3, 8, 8]


@pytest.mark.parametrize(
    ("path", "data", "query", "message"),
    [
        ("apem", {"method": "gradient", "target_class": "1"}, "", "unknown form field 'target_class'"),
        ("explain", {"method": "gradient", "stages": "1", "scor": "apem"}, "", "'scor', 'stages'"),
        ("attack", {"method": "fgsm", "epsilon": "0.1"}, "", "unknown form field 'epsilon'"),
        ("predict", {}, "?topk=2", "unknown query parameter 'topk'"),
    ],
)
def test_unknown_fields_are_named_not_ignored(
    client: TestClient, path: str, data: dict, query: str, message: str
) -> None:
    """A misspelt option would otherwise give its default without a word."""
    before = len(fake_torchserve.State.requests)
    reply = client.post(f"/v1/models/shapes-resnet/{path}{query}", files=files(), data=data)
    body = assert_error(reply, 422, "unknown_field")
    assert message in body["error"]["message"] and "takes:" in body["error"]["message"]
    assert len(fake_torchserve.State.requests) == before  # refused before TorchServe
    unauthenticated = client.post(
        f"/v1/models/shapes-resnet/{path}{query}", files=files(), data=data, headers={"Authorization": ""}
    )
    assert_error(unauthenticated, 401, "unauthorized")  # the key is checked first


@pytest.mark.parametrize(
    ("path", "data", "code"),
    [
        ("explain", {"method": "nope"}, "unknown_method"),
        ("explain", {"method": "gradient", "target": "7"}, "invalid_target"),
        ("explain", {"method": "gradient", "params": "{bad json"}, "invalid_params"),
        ("explain", {"method": "gradient", "params": "[1, 2]"}, "invalid_params"),
        ("attack", {"method": "cw"}, "invalid_request"),
        ("attack", {"method": "fgsm", "params": '{"epsilon": 5}'}, "invalid_params"),
        ("attack", {"method": "fgsm", "params": '{"steps": 0}'}, "invalid_params"),
        ("attack", {"method": "fgsm", "params": '{"bogus": 1}'}, "invalid_params"),
        ("attack", {"method": "fgsm", "params": '{"target_class": 3}'}, "invalid_target"),
        ("apem", {}, "invalid_request"),
        ("apem", {"method": "gradient", "apem_params": "[1]"}, "invalid_params"),
        ("apem", {"method": "gradient", "apem_params": '{"max_steps": 0}'}, "invalid_params"),
        ("apem", {"method": "gradient", "apem_params": '{"grid": 1}'}, "invalid_params"),
        ("explain", {"method": "gradient", "score": "apem", "apem_params": '{"search": "x"}'}, "invalid_params"),
        ("explain", {"method": "gradient", "apem_params": "{}"}, "invalid_request"),
        ("attack", {"method": "fgsm", "explain": "nope"}, "unknown_method"),
        ("attack", {"method": "fgsm", "explain_params": "{}"}, "invalid_request"),
        ("attack", {"method": "fgsm", "explain": "gradient", "explain_params": "{x"}, "invalid_params"),
        ("attack", {"method": "fgsm", "params": '{"seed": -1}'}, "invalid_params"),
    ],
)
def test_bad_parameters_422(client: TestClient, path: str, data: dict, code: str) -> None:
    before = len(fake_torchserve.State.requests)
    assert_error(
        client.post(f"/v1/models/shapes-resnet/{path}", files=files(), data=data), 422, code
    )
    assert all(r["task"] == "describe" for r in fake_torchserve.State.requests[before:])


def test_target_classes_are_refused_as_the_handler_refuses_them(client: TestClient) -> None:
    """One check of a class index (``protocol.validation.check_class_index``): the gateway's
    refusal has the handler's code and message shape, under the name the request used."""
    for path, data, name in (
        ("explain", {"method": "gradient", "target": "3"}, "target"),
        ("attack", {"method": "pgd", "params": '{"target_class": 5}'}, "params.target_class"),
    ):
        body = assert_error(client.post(f"/v1/models/shapes-resnet/{path}", files=files(), data=data), 422,
                            "invalid_target")
        value = data.get("target") or json.loads(data["params"])["target_class"]
        assert body["error"]["message"] == f"{name}: class {value} is out of range for a model with 3 classes"


def test_bad_images(client: TestClient) -> None:
    url = "/v1/models/shapes-resnet/predict"
    assert_error(client.post(url, files=files(b"")), 422, "empty_image")
    assert_error(client.post(url, files=files(b"GIF89a-not-really")), 422, "invalid_image")
    assert_error(client.post(url, files=files(b"%PDF-1.4")), 415)
    assert_error(client.post(url, files=files(png((1001, 1001)))), 413, "image_too_large")
    assert_error(client.post(url, files=files(b"\x89PNG\r\n\x1a\n" + b"\x00" * 300_000)), 413)
    assert client.post(url, files=files(png((1, 1)))).status_code == 200
    assert_error(client.post(url), 422)


def test_torchserve_errors_mapped(client: TestClient) -> None:
    url = "/v1/models/shapes-resnet/predict"
    client.get("/v1/models/shapes-resnet")  # cache describe
    fake_torchserve.State.mode = "busy"
    reply = client.post(url, files=files())
    assert_error(reply, 503, "model_server_busy")
    assert int(reply.headers["retry-after"]) >= 1
    fake_torchserve.State.mode = "reject"
    assert_error(client.post(url, files=files()), 422, "invalid_params")
    fake_torchserve.State.mode = "hang"
    assert_error(client.post(url, files=files()), 504, "model_server_timeout")
    fake_torchserve.State.mode = "ok"
    assert client.post(url, files=files()).status_code == 200


def test_calls_tell_torchserve_how_long_their_caller_waits(client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    """The gateway's read timeout travels as X-Beyond-Time-Limit (the handler stops its work
    before it); a job's call says the jobs' longer wait."""
    from service.torchserve_client import SyncTorchServeClient

    assert client.post("/v1/models/shapes-resnet/predict", files=files()).status_code == 200
    assert fake_torchserve.State.time_limits[-1] == f"{settings.torchserve_timeout_s:g}" == "2"
    with SyncTorchServeClient(settings) as jobs_client:
        jobs_client.describe("shapes-resnet")
    assert fake_torchserve.State.time_limits[-1] == f"{settings.torchserve_job_timeout_s:g}" == "600"


def test_torchserve_down(settings, redis_server) -> None:  # type: ignore[no-untyped-def]
    from model_store.stack import free_port
    from service.gateway.app import create_app

    down = settings.model_copy(update={"torchserve_url": f"http://127.0.0.1:{free_port()}"})
    with TestClient(create_app(down), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert_error(c.get("/v1/models"), 503, "model_server_unavailable")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "torchserve" in ready.json()["error"]["message"]


def test_form_field_flood_refused(client: TestClient) -> None:
    fields = {f"f{i}": "x" for i in range(200)}
    reply = client.post("/v1/models/shapes-resnet/predict", files=files(), data=fields)
    assert 400 <= reply.status_code < 500


def test_metrics(client: TestClient) -> None:
    client.post("/v1/models/shapes-resnet/predict", files=files())
    text = client.get("/metrics").text
    assert 'route="/v1/models/{model}/predict"' in text and 'model="shapes-resnet"' in text
    assert "beyond_queue_jobs" in text and "beyond_http_request_duration_seconds" in text


def test_openapi_lists_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in [
        "/v1/models/{model}/predict",
        "/v1/models/{model}/explain",
        "/v1/datasets",
        "/v1/jobs/{job_id}/result",
        "/readyz",
    ]:
        assert path in paths

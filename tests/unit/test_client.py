"""The Python client and command line against the gateway (fake TorchServe, real Redis)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.client import BeyondClient, BeyondError, folder_archive, main, shown
from tests.unit import fake_torchserve
from tests.unit.conftest import API_KEY
from tests.unit.test_gateway import png


def test_calls_send_the_forms_the_gateway_takes(client: TestClient) -> None:
    beyond = BeyondClient(http=client, retries=0)
    assert beyond.predict("shapes-resnet", png(), top_k=2)["predictions"][0]["label"] == "circle"
    beyond.explain("shapes-resnet", png(), "gradient", params={"a": 1}, outputs=["relevance", "path_png"],
                   score="apem", apem_params={"max_steps": 9})
    sent = fake_torchserve.State.requests[-1]
    assert sent["params"] == {"a": 1} and sent["outputs"] == ["relevance", "path_png"]
    assert sent["apem_params"] == {"max_steps": 9} and sent["score"] == "apem"
    reply = beyond.attack("shapes-resnet", png(), "pgd", params={"epsilon": 0.02}, explain="gradient",
                          adversarial_array=True)
    assert reply["explanation"]["method"] == "gradient" and reply["adversarial_array"]["shape"] == [3, 8, 8]
    assert fake_torchserve.State.requests[-1]["params"] == {"epsilon": 0.02}
    assert beyond.apem("shapes-resnet", png(), "gradient", apem_params={"normalise": True})["apem_norm"] == 0.5


def test_refusals_raise_with_the_gateways_code(client: TestClient) -> None:
    beyond = BeyondClient(http=client, retries=0)
    with pytest.raises(BeyondError) as refused:
        beyond.explain("shapes-resnet", png(), "nope")
    assert refused.value.status == 422 and refused.value.code == "unknown_method"
    with pytest.raises(BeyondError) as missing:
        beyond.job("a" * 32)
    assert missing.value.code == "job_not_found"
    fake_torchserve.State.mode = "busy"
    with pytest.raises(BeyondError) as busy:
        beyond.predict("shapes-resnet", png())
    assert busy.value.status == 503 and busy.value.code == "model_server_busy"


def test_overload_is_retried_after_retry_after() -> None:
    replies = iter([
        httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"code": "overloaded", "message": "m"}}),
        httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"code": "model_server_busy", "message": "m"}}),
        httpx.Response(200, json={"models": []}),
    ])
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return next(replies)

    http = httpx.Client(base_url="http://beyond", transport=httpx.MockTransport(answer))
    assert BeyondClient(api_key="k", retries=2, http=http).models() == {"models": []}
    assert seen == ["Bearer k"] * 3
    replies = iter([httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"code": "overloaded", "message": "m"}})] * 2)
    with pytest.raises(BeyondError, match="overloaded"):
        BeyondClient(retries=1, http=httpx.Client(base_url="http://beyond", transport=httpx.MockTransport(answer))).models()


def test_dataset_folder_upload_and_a_job_to_its_result(client: TestClient, settings, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    from tests.unit.test_datasets_jobs import colored, run_worker

    for i in range(1, 5):
        (tmp_path / "data" / "circle").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "circle" / f"{i}.png").write_bytes(colored(i))
    names = zipfile.ZipFile(io.BytesIO(folder_archive(tmp_path / "data"))).namelist()
    assert names == [f"circle/{i}.png" for i in range(1, 5)]
    beyond = BeyondClient(http=client, retries=0)
    dataset = beyond.upload_dataset(tmp_path / "data")
    assert dataset["classes"] == {"circle": 4}
    job = beyond.submit_job({"type": "apem", "model": "shapes-resnet", "dataset_id": dataset["dataset_id"],
                             "method": "gradient"})
    run_worker(settings, monkeypatch)
    result = beyond.wait_result(job, timeout=10)
    assert result["n_scored"] == 4 and result["spearman"]["rho"] == pytest.approx(1.0)
    failing = beyond.submit_job({"type": "criticism", "model": "shapes-resnet", "dataset_id": dataset["dataset_id"],
                                 "class_name": "circle", "method": "probs", "m": 1})
    beyond.delete_dataset(dataset["dataset_id"])
    run_worker(settings, monkeypatch)
    with pytest.raises(BeyondError) as failed:
        beyond.wait_result(failing, timeout=10)
    assert failed.value.status == 409 and "dataset not found" in failed.value.message


def test_the_command_line_shows_pictures_by_size_and_saves_them(tmp_path: Path) -> None:
    picture = png()
    reply = {"attack": {"adversarial_png": base64.b64encode(picture).decode(), "linf": 0.01}, "items": [1]}
    out = shown(reply, tmp_path)
    assert out == {"attack": {"adversarial_png": f"<png, {len(picture)} bytes, attack.adversarial_png.png>",
                              "linf": 0.01}, "items": [1]}
    assert (tmp_path / "attack.adversarial_png.png").read_bytes() == picture


def test_the_command_line_end_to_end(client: TestClient, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    image = tmp_path / "x.png"
    image.write_bytes(png())
    params = tmp_path / "params.json"
    params.write_text('{"a": 2}')
    assert main(["--api-key", API_KEY, "explain", "shapes-resnet", str(image), "--method", "gradient",
                 "--params", str(params), "--score-apem", "--apem-params", '{"max_steps": 3}'], http=client) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["method"] == "gradient" and body["heatmap_png"].startswith("<png")
    assert fake_torchserve.State.requests[-1]["params"] == {"a": 2}
    assert main(["--api-key", API_KEY, "predict", "nope", str(image)], http=client) == 1
    assert json.loads(capsys.readouterr().err)["error"]["code"] == "model_not_found"

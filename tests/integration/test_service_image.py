"""The service image's install, run for real: the gateway and an RQ worker without torch.

The service Docker image (``Dockerfile`` target ``service``) installs
``docker/requirements-service.txt`` with ``-c requirements.lock`` and then the project with
``pip install --no-deps .``: torch, torchvision, captum, scipy and the rest of the tensor side
are not there. A service module that reaches for the torch side works in the development
environment and breaks only in that image, and an import inside a function breaks only when
its route runs: ``service.jobs.criticism.check_params`` imported ``handlers.attacks.params``
lazily, so ``POST /v1/jobs`` of a criticism job answered 500 (``ModuleNotFoundError: torch``)
in the image while every test passed. The torch-free code has since moved to ``protocol/``,
and the import rules (``tests/unit/test_import_rules.py``) read the imports as written; this
test checks what runs. (Run on the commit before that move, its criticism tests fail with
that very 500.)

A virtualenv is built here as the image builds its own (the same requirements and constraints,
then a non-editable ``--no-deps`` install of a copy of what the Dockerfile copies, without the
data ``.dockerignore`` leaves out). The gateway and one RQ worker run from it, with its folder
of state as working directory like the image's ``WORKDIR`` and no ``PYTHONPATH``, so nothing
comes from the checkout. They use the integration suite's TorchServe (which needs torch: it
runs from the development venv, as its own image does) and a redis-server of their own, so
the suite's worker, which has torch, cannot take their jobs. Through that gateway every route
and every job type (criticism with each selection method) runs to a real result.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model_store.shapes import CLASS_NAMES
from model_store.stack import (
    ManagedProcess,
    RedisServer,
    free_port,
    gateway_process,
    service_env,
    wait_ready,
    worker_process,
)
from tests.integration.conftest import API_KEY, MODEL, REPO, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PNG = b"\x89PNG\r\n\x1a\n"
TORCH_SIDE = ("torch", "torchvision", "captum", "zennit", "scipy", "sklearn", "skimage", "ts")
METHODS = ("gradient", "smoothgrad", "integrated_gradients", "lrp", "lime", "gradcam", "nam", "sis")
EXPLAIN_PARAMS = {"lime": {"n": 300}, "smoothgrad": {"n": 8}}
NOT_PASSED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")

IMPORT_CHECK = """
import importlib, json, pkgutil, sys
import protocol, service
imported = []
for package in (protocol, service):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
        imported.append(module.name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"handlers", "model_store", *TORCH_SIDE})
missing = {}
for name in [*TORCH_SIDE, "handlers.tasks", "handlers.torchserve_handler", "model_store.build"]:
    try:
        importlib.import_module(name)
        missing[name] = None
    except ModuleNotFoundError as exc:
        missing[name] = exc.name
print(json.dumps({"imported": imported, "loaded": loaded, "missing": missing,
                  "service": service.__file__, "prefix": sys.prefix}))
"""


def _image_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) without what would point at the checkout or the development
    venv, with the image's ``PYTHONDONTWRITEBYTECODE``."""
    kept = {k: v for k, v in (env or os.environ).items() if k not in NOT_PASSED}
    return {**kept, "PYTHONDONTWRITEBYTECODE": "1"}


def dockerfile_copies() -> list[str]:
    """The sources the Dockerfile's service build stage copies (``COPY <src>... <dest>``)."""
    stage = (
        (REPO / "Dockerfile").read_text().split(" AS service-build", 1)[1].split("\nFROM ", 1)[0]
    )
    sources = []
    for line in stage.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--") for w in words):
            sources += words[1:-1]
    return sources


def _copy_build_context(dest: Path) -> None:
    """What the Dockerfile's service build stage copies, without what .dockerignore leaves
    out (its paths, and its ``**/`` names), each under its own path."""
    left_out, everywhere = set(), []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip().rstrip("/")
        if pattern and not pattern.startswith(("#", "!")) and pattern != "**":
            if pattern.startswith("**/"):
                everywhere.append(pattern[3:])
            else:
                left_out.add(REPO / pattern)

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [
            n
            for n in names
            if Path(folder) / n in left_out or any(fnmatch(n, p) for p in everywhere)
        ]

    for source in dockerfile_copies():
        (dest / source).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, dest / source, ignore=ignore)
        else:
            shutil.copy2(REPO / source, dest / source)


def _run(command: list[str], cwd: Path, timeout: float = 600) -> None:
    done = subprocess.run(
        command, cwd=cwd, env=_image_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a virtualenv installed as the service image's (about 20 s): its
    requirements with the lock as constraints, then the project alone, not editable."""
    root = tmp_path_factory.mktemp("service-image")
    src = root / "src"
    _copy_build_context(src)
    assert {"pyproject.toml", "service", "requirements.lock"} <= set(os.listdir(src))
    _run([sys.executable, "-m", "venv", str(root / "venv")], root)
    python = root / "venv" / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--no-compile", "--no-cache-dir"]
    requirements = ["-r", str(src / "docker" / "requirements-service.txt")]
    _run([*pip, *requirements, "-c", str(src / "requirements.lock")], root)
    _run([*pip, "--no-deps", str(src)], root)
    shutil.rmtree(root / "src")  # nothing can be imported from the copy either
    return python


@dataclass
class ImageStack:
    python: Path
    state: Path
    base_url: str
    env: dict[str, str]
    redis: RedisServer
    worker: ManagedProcess
    gateway: ManagedProcess


@pytest.fixture(scope="module")
def image_stack(
    stack: Stack, image_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ImageStack]:
    """Gateway and worker from the image venv, on the suite's TorchServe and their own Redis."""
    state = tmp_path_factory.mktemp("image-state")
    redis = RedisServer(free_port(), state)
    port = free_port()
    wiring = {
        "environment": "production",  # as the image's ENV
        "api_keys": API_KEY,
        "state_dir": str(state),
        "models": MODEL,
        "port": str(port),
        "redis_url": redis.url,
        "torchserve_url": stack.ts.inference_url,
        "torchserve_key_file": str(stack.ts.key_file),
        "torchserve_timeout_s": "60",
        "job_retries": "0",
        "embed_batch_size": "4",
        "chunk_images": "4",  # the larger jobs fan out into chunks and a reduce
    }
    env = _image_env(service_env(stack.settings, **wiring))
    env["PATH"] = f"{image_python.parent}{os.pathsep}{env.get('PATH', '')}"  # as the image's ENV
    logs = state / "logs"
    worker = worker_process(env, logs / "worker.log", python=str(image_python))
    gateway = gateway_process(
        env, "127.0.0.1", port, logs / "gateway.log", python=str(image_python)
    )
    for process in (worker, gateway):
        process.cwd = state  # the image's WORKDIR; `-m` puts it first on sys.path: no checkout
    running = ImageStack(
        image_python, state, f"http://127.0.0.1:{port}", env, redis, worker, gateway
    )
    try:
        redis.start()
        worker.start()
        gateway.start()
        wait_ready(running.base_url, 120, check=gateway)
        yield running
    finally:
        for process in (gateway, worker, redis):
            process.stop()


@pytest.fixture(scope="module")
def api(image_stack: ImageStack) -> Iterator[httpx.Client]:
    """A client of the image venv's gateway (the conftest's ``api`` is the development one's)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=image_stack.base_url, headers=headers, timeout=180) as client:
        yield client


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def star(shapes_split) -> bytes:  # noqa: ANN001
    split = shapes_split("spurious", "test")
    return _png(
        split.images[next(i for i, a in enumerate(split.attributes) if a["class_name"] == "star")]
    )


def _files(data: bytes) -> dict:
    return {"image": ("star.png", data, "image/png")}


def _npy(body: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(body["data"])), allow_pickle=False)


@dataclass
class Dataset:
    """Four circles and two stars filed as circles (raters vote `star` for both), four squares
    on the planted grass with their core and spurious masks: ten images."""

    dataset_id: str
    files: dict[str, bytes]
    indices: dict[str, int]
    stars: list[str]


@pytest.fixture(scope="module")
def dataset(api: httpx.Client, shapes_split) -> Dataset:  # noqa: ANN001
    split = shapes_split("spurious", "test")
    of = [a["class_name"] for a in split.attributes]
    circles = [i for i, name in enumerate(of) if name == "circle"][:4]
    stars = [i for i, name in enumerate(of) if name == "star"][:2]
    squares = [
        i
        for i, a in enumerate(split.attributes)
        if a["class_name"] == "square" and a["background"] == "grass"
    ][:4]
    names = {
        **{f"circle/{i:05d}.png": i for i in circles + stars},
        **{f"square/{i:05d}.png": i for i in squares},
    }
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, i in names.items():
            zf.writestr(name, _png(split.images[i]))
        for i in squares:
            for kind in ("core", "spurious"):
                mask = getattr(split, f"{kind}_masks")[i].astype(np.uint8) * 255
                zf.writestr(f"_masks/{kind}/square/{i:05d}.png", _png(mask))
        votes = "".join(f"circle/{i:05d}.png,star,5\n" for i in stars)
        zf.writestr("metadata.csv", "file,class_name,yes\n" + votes)
    reply = api.post(
        "/v1/datasets", files={"archive": ("d.zip", archive.getvalue(), "application/zip")}
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["classes"] == {"circle": 6, "square": 4} and body["n_images"] == 10, body
    assert body["has_metadata"] and body["masks"] == {"core": 4, "spurious": 4}, body
    return Dataset(
        body["dataset_id"],
        {name: _png(split.images[i]) for name, i in names.items()},
        names,
        [f"circle/{i:05d}.png" for i in stars],
    )


def _wait(api: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = api.get(f"/v1/jobs/{job_id}")
        assert reply.status_code == 200, reply.text
        body = reply.json()
        if body["status"] in ("finished", "failed", "canceled"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {body['status']} after {timeout:.0f} s")


def _job(api: httpx.Client, spec: dict) -> dict:
    """Submit ``spec``, wait, and return the finished job's result."""
    accepted = api.post("/v1/jobs", json=spec)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert accepted.json()["status_url"] == f"/v1/jobs/{job_id}"
    status = _wait(api, job_id)
    assert status["status"] == "finished" and status["progress"] == 1.0, status
    assert status["type"] == spec["type"] and status["error"] is None, status
    result = api.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["type"] == spec["type"] and body["model"] == MODEL, body
    return body


def _error(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code, reply.text


def test_the_image_venv_has_no_torch_and_imports_every_service_module(image_python: Path) -> None:
    """As the Dockerfile's own check: every module of service/ and protocol/ imports, and
    none of them loads the torch side, which is not installed at all."""
    script = f"TORCH_SIDE = {TORCH_SIDE!r}\n{IMPORT_CHECK}"
    done = subprocess.run(
        [str(image_python), "-c", script],
        cwd=image_python.parents[2],
        env=_image_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["prefix"] == str(image_python.parents[1])
    assert report["service"].startswith(str(image_python.parents[1] / "lib")), report["service"]
    assert {
        "service.gateway.app",
        "service.jobs.worker",
        "service.jobs.criticism",
        "service.torchserve_proxy",
        "protocol.criticism.methods",
    } <= set(report["imported"])
    assert report["loaded"] == [], report["loaded"]
    missing = report["missing"]
    assert all(missing[name] == name for name in TORCH_SIDE), missing
    assert missing["handlers.tasks"] and missing["handlers.torchserve_handler"] == "torch", missing
    assert missing["model_store.build"] == "torch", missing


def test_health_ready_metrics_docs_and_the_image_healthcheck(
    image_stack: ImageStack, api: httpx.Client
) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "checks": {"torchserve": "ok", "redis": "ok"},
        "error": None,
    }
    metrics = api.get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    assert api.get("/docs").status_code == 200
    assert {"/v1/jobs", "/v1/datasets", "/v1/models/{model}/explain"} <= set(
        api.get("/openapi.json").json()["paths"]
    )
    with httpx.Client(base_url=image_stack.base_url, timeout=10) as anonymous:
        _error(anonymous.get("/v1/models"), 401, "unauthorized")
    for role in ("gateway", "worker"):  # the image's HEALTHCHECK, from the image's python
        probe = subprocess.run(
            [str(image_stack.python), "-m", "service.healthcheck", role],
            cwd=image_stack.state,
            env=image_stack.env,
            timeout=60,
        )
        assert probe.returncode == 0, role


def test_models_list_and_detail(api: httpx.Client) -> None:
    (listed,) = api.get("/v1/models").json()["models"]
    assert listed["name"] == MODEL and listed["num_classes"] == len(CLASS_NAMES)
    assert set(METHODS) <= set(listed["explainers"])
    assert {"fgsm", "ifgsm", "pgd"} <= set(listed["attacks"])
    detail = api.get(f"/v1/models/{MODEL}")
    assert detail.status_code == 200, detail.text
    assert detail.json()["labels"] == list(CLASS_NAMES)
    _error(api.get("/v1/models/nope"), 404, "model_not_found")


def test_predict_over_http_and_with_the_image_client(
    image_stack: ImageStack, api: httpx.Client, star: bytes, tmp_path: Path
) -> None:
    reply = api.post(f"/v1/models/{MODEL}/predict", params={"top_k": 3}, files=_files(star))
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    assert [p["label"] for p in predictions][:1] == ["star"] and len(predictions) == 3
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True) and 0.5 < probabilities[0] <= 1
    _error(
        api.post(f"/v1/models/{MODEL}/predict", files=_files(b"plain text")),
        415,
        "unsupported_image_format",
    )
    image = tmp_path / "star.png"
    image.write_bytes(star)
    cli = subprocess.run(
        [
            str(image_stack.python),
            "-m",
            "service.client",
            "--url",
            image_stack.base_url,
            "--api-key",
            API_KEY,
            "predict",
            MODEL,
            str(image),
            "--top-k",
            "1",
        ],
        cwd=image_stack.state,
        env=image_stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["predictions"][0]["label"] == "star"


@pytest.mark.parametrize("method", METHODS)
def test_explain_with_every_method(api: httpx.Client, star: bytes, method: str) -> None:
    params = EXPLAIN_PARAMS.get(method, {})
    reply = api.post(
        f"/v1/models/{MODEL}/explain",
        files=_files(star),
        data={"method": method, "params": json.dumps(params)},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == MODEL and body["method"] == method and body["target"] == 3
    assert body["prediction"]["label"] == "star"
    assert {k: body["params"][k] for k in params} == params
    relevance = _npy(body["relevance"])
    assert relevance.shape == (64, 64) and 0 <= relevance.min() and 0 < relevance.max() <= 1
    for picture in ("heatmap_png", "overlay_png"):
        assert base64.b64decode(body[picture]).startswith(PNG)


def test_explain_scored_by_apem_and_refusals(api: httpx.Client, star: bytes) -> None:
    url = f"/v1/models/{MODEL}/explain"
    reply = api.post(
        url,
        files=_files(star),
        data={
            "method": "gradient",
            "target": "0",
            "score": "apem",
            "apem_params": json.dumps({"max_steps": 300}),
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["target"] == 0 and body["apem"]["params"]["max_steps"] == 300
    for data, code in (
        ({"method": "nope"}, "unknown_method"),
        ({"method": "gradient", "target": "999"}, "invalid_target"),
        ({"method": "smoothgrad", "params": json.dumps({"n": 0})}, "bad_parameter"),
        ({"method": "gradient", "apem_params": json.dumps({"max_steps": 5})}, "invalid_request"),
    ):
        _error(api.post(url, files=_files(star), data=data), 422, code)


def test_attack_with_every_method(api: httpx.Client, star: bytes) -> None:
    url = f"/v1/models/{MODEL}/attack"
    reply = api.post(
        url,
        files=_files(star),
        data={
            "method": "ifgsm",
            "params": json.dumps({"step_size": 0.008, "steps": 10}),
            "explain": "gradient",
            "adversarial_array": "true",
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["original"]["label"] == "star" and body["success"]
    assert body["adversarial"]["label"] != "star" and 1 <= body["steps_to_flip"] <= 10
    assert body["linf"] <= 0.08 + 1e-6 and _npy(body["adversarial_array"]).shape == (3, 64, 64)
    assert body["explanation"]["target"] == body["adversarial"]["class_index"]
    for picture in ("adversarial_png", "perturbation_png"):
        assert base64.b64decode(body[picture]).startswith(PNG)
    for method in ("fgsm", "pgd"):
        reply = api.post(url, files=_files(star), data={"method": method})
        assert reply.status_code == 200, reply.text
        assert reply.json()["method"] == method and reply.json()["original"]["label"] == "star"
    refused = api.post(url, files=_files(star), data={"method": "pgd", "params": '{"epsilon": 2}'})
    assert refused.status_code == 422, refused.text


def test_apem_from_a_method_and_from_an_uploaded_map(api: httpx.Client, star: bytes) -> None:
    url = f"/v1/models/{MODEL}/apem"
    by_method = api.post(
        url,
        files=_files(star),
        data={
            "method": "gradient",
            "apem_params": json.dumps({"max_steps": 500}),
        },
    )
    assert by_method.status_code == 200, by_method.text
    body = by_method.json()
    assert body["method"] == "gradient" and body["target"] == 3
    assert body["params"]["max_steps"] == 500
    assert body["eps_minus"] is None or 0 < body["eps_minus"] <= 500
    uploaded = io.BytesIO()
    np.save(uploaded, np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
    relevance = {"relevance": ("r.npy", uploaded.getvalue(), "application/octet-stream")}
    reply = api.post(url, files={**_files(star), **relevance})
    assert reply.status_code == 200, reply.text
    assert reply.json()["method"] is None and reply.json()["grid"]["max_steps"] > 0
    _error(api.post(url, files=_files(star)), 422, "invalid_request")


def test_dataset_upload_get_and_delete(api: httpx.Client) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ring/a.png", _png(np.full((64, 64, 3), 200, np.uint8)))
        zf.writestr("ring/broken.png", PNG + b"truncated")
    uploaded = api.post(
        "/v1/datasets", files={"archive": ("d.zip", archive.getvalue(), "application/zip")}
    )
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert body["classes"] == {"ring": 1} and body["skipped"][0]["file"] == "ring/broken.png"
    dataset_id = body["dataset_id"]
    got = api.get(f"/v1/datasets/{dataset_id}")
    assert got.status_code == 200 and got.json()["classes"] == {"ring": 1}, got.text
    assert api.delete(f"/v1/datasets/{dataset_id}").json() == {"deleted": dataset_id}
    _error(api.get(f"/v1/datasets/{dataset_id}"), 404, "dataset_not_found")
    _error(api.delete(f"/v1/datasets/{dataset_id}"), 404, "dataset_not_found")
    not_an_archive = api.post(
        "/v1/datasets", files={"archive": ("d.zip", b"plain", "application/zip")}
    )
    assert not_an_archive.status_code == 415, not_an_archive.text


CRITICISM_PARAMS = {
    "adversarial": {"attack": "ifgsm", "attack_params": {"step_size": 0.004, "steps": 10}},
    "mmd": {},
    "probs": {},
    "random": {"seed": 1},
}


@pytest.mark.parametrize("method", sorted(CRITICISM_PARAMS))
def test_criticism_job_with_every_selection_method(
    api: httpx.Client, dataset: Dataset, method: str
) -> None:
    """The job whose check once imported torch in the gateway: each method to its result."""
    result = _job(
        api,
        {
            "type": "criticism",
            "model": MODEL,
            "dataset_id": dataset.dataset_id,
            "class_name": "circle",
            "method": method,
            "m": 2,
            "params": CRITICISM_PARAMS[method],
        },
    )
    assert result["method"] == method and result["n_candidates"] == 6 and result["m"] == 2
    circles = {name for name in dataset.files if name.startswith("circle/")}
    picked = result["prototypes"] + result["criticisms"]
    assert picked and {item["file"] for item in picked} <= circles, picked
    assert len(result["prototypes"]) <= 2 and len(result["criticisms"]) <= 2
    if method in ("mmd", "random"):  # they always fill both rows
        assert len(result["prototypes"]) == 2 and len(result["criticisms"]) == 2
    if method == "probs":  # the two stars filed as circles are the least circle-like
        assert sorted(item["file"] for item in result["criticisms"]) == sorted(dataset.stars)
        assert all(0 <= item["score"] < 0.1 for item in result["criticisms"]), result["criticisms"]
    if method == "adversarial":  # never flipped in 10 steps vs. flipped soonest
        assert result["score_name"] == "steps_to_flip" and "robustness" in result["details"]
        assert all(item["score"] is None for item in result["prototypes"]), result
        assert all(1 <= item["score"] <= 10 for item in result["criticisms"]), result
    assert base64.b64decode(result["gallery_png"]).startswith(PNG)


def test_criticism_job_refusals(api: httpx.Client, dataset: Dataset) -> None:
    """The gateway's own check of the parameters (the code that imported torch) answers 422."""
    base = {
        "type": "criticism",
        "model": MODEL,
        "dataset_id": dataset.dataset_id,
        "class_name": "circle",
        "m": 2,
    }
    for method, params, says in (
        ("adversarial", {"attack": "nope"}, "unknown attack"),
        ("adversarial", {"attack_params": {"steps": 0}}, "attack_params.steps"),
        ("probs", {"low": 0.95}, "low"),
        ("random", {"nope": 1}, "nope"),
    ):
        reply = api.post("/v1/jobs", json={**base, "method": method, "params": params})
        _error(reply, 422, "invalid_params")
        assert says in reply.json()["error"]["message"], reply.text
    _error(
        api.post("/v1/jobs", json={**base, "method": "mmd", "class_name": "ring"}),
        422,
        "unknown_class",
    )


def test_filter_job(api: httpx.Client, star: bytes) -> None:
    result = _job(
        api,
        {
            "type": "filter",
            "model": MODEL,
            "method": "gradient",
            "image": base64.b64encode(star).decode(),
            "filter_params": {"levels": 16},
            "apem_params": {"max_steps": 300},
        },
    )
    assert result["method"] == "gradient" and result["filter_params"]["levels"] == 16
    assert result["apem_after"] >= result["apem_before"] and 0 < result["fraction_kept"] <= 1
    assert result["filtered"]["shape"] == [64, 64] and result["calls"] >= 1
    for picture in ("heatmap_png", "overlay_png"):
        assert base64.b64decode(result[picture]).startswith(PNG)


def test_apem_job_matches_the_single_image_route(api: httpx.Client, dataset: Dataset) -> None:
    apem_params = {"step": 4, "max_steps": 500}
    result = _job(
        api,
        {
            "type": "apem",
            "model": MODEL,
            "dataset_id": dataset.dataset_id,
            "method": "gradient",
            "apem_params": apem_params,
        },
    )
    assert result["n_scored"] == result["n_candidates"] == 10 and result["params"]["step"] == 4
    assert result["spearman"] is not None and -1 <= result["spearman"]["rho"] <= 1
    assert 0.5 < result["accuracy"] < 1  # the two stars filed as circles are wrong
    (item,) = [i for i in result["items"] if i["file"] == dataset.stars[0]]
    alone = api.post(
        f"/v1/models/{MODEL}/apem",
        files=_files(dataset.files[item["file"]]),
        data={"method": "gradient", "apem_params": json.dumps(apem_params)},
    ).json()
    assert (item["eps_minus"], item["eps_plus"], item["prediction"]) == (
        alone["eps_minus"],
        alone["eps_plus"],
        alone["target"],
    )
    assert item["label"] == CLASS_NAMES.index("circle") and item["loss"] > 0


def test_audit_job_with_groups_and_region_masks(api: httpx.Client, dataset: Dataset) -> None:
    result = _job(
        api,
        {
            "type": "audit",
            "model": MODEL,
            "dataset_id": dataset.dataset_id,
            "class_name": "square",
            "top_k": 2,
            "sigmas": [0.25, 1.0],
            "gallery_images": 1,
            "groups": {"spurious": [0, 1], "core": [2]},
        },
    )
    (audited,) = result["classes"]
    assert audited["class_name"] == "square" and audited["n_images"] == 4
    assert audited["accuracy"] == 1 and len(audited["features"]) == 2
    assert [g["name"] for g in audited["groups"]] == ["spurious", "core"]
    for feature in audited["features"]:
        assert [n["sigma"] for n in feature["noise"]] == [0.25, 1.0]
        assert all(0 <= n["accuracy"] <= 1 for n in feature["noise"])
        (shown,) = feature["top_images"]
        assert base64.b64decode(shown["overlay_png"]).startswith(PNG)
    assert [n["sigma"] for n in audited["core_accuracy"]] == [0.25, 1.0]
    # the model reads the planted grass: noise on the square keeps it, noise on the grass not
    core_kept = audited["annotated_spurious_accuracy"][0]["accuracy"]
    grass_kept = audited["annotated_core_accuracy"][0]["accuracy"]
    assert core_kept > grass_kept, audited


def test_evaluate_job_matches_the_model(
    api: httpx.Client,
    dataset: Dataset,
    shapes_split,  # noqa: ANN001
    demo_model,  # noqa: ANN001
) -> None:
    """Top-1 error as the model itself predicts the ten images; the raters' votes for `star`
    rectify the two stars filed as circles."""
    import torch

    from model_store.train import to_tensor

    result = _job(api, {"type": "evaluate", "model": MODEL, "dataset_id": dataset.dataset_id})
    model, _ = demo_model(MODEL)
    names = sorted(dataset.indices)
    labels = torch.tensor([CLASS_NAMES.index(name.split("/")[0]) for name in names])
    with torch.no_grad():
        predicted = model(
            to_tensor(shapes_split("spurious", "test").images[[dataset.indices[n] for n in names]])
        ).argmax(1)
    wrong = int((predicted != labels).sum())
    assert result["n_images"] == 10 and wrong >= 2
    assert result["top1_error"] == pytest.approx(wrong / 10)
    assert result["rectified"]["top1_error"] == pytest.approx((wrong - 2) / 10)
    assert {c["class_name"] for c in result["per_class"]} == {"circle", "square"}
    assert {"class_name": "circle", "predicted": "star", "count": 2} in result["confusions"]


def test_overinterpretation_job_with_region_masks(api: httpx.Client, dataset: Dataset) -> None:
    result = _job(
        api,
        {
            "type": "overinterpretation",
            "model": MODEL,
            "dataset_id": dataset.dataset_id,
            "class_name": "square",
            "gallery_images": 2,
        },
    )
    assert result["n_images"] == 4 and result["accuracy"] == 1.0
    assert [i["file"] for i in result["items"]] == sorted(
        n for n in dataset.files if n.startswith("square/")
    )
    assert all(0 < i["sis_fraction"] <= 1 and i["sis_confidence"] >= 0.9 for i in result["items"])
    grass, square = result["regions"]["spurious"], result["regions"]["core"]
    assert grass["n_images"] == square["n_images"] == 4
    assert grass["subset_share"] > square["subset_share"], result["regions"]
    assert len(result["gallery"]) == 2
    assert all(base64.b64decode(g["subset_png"]).startswith(PNG) for g in result["gallery"])


def test_job_cancel_status_result_and_unknown_jobs(api: httpx.Client, dataset: Dataset) -> None:
    """A job queued behind a running one is canceled; its result and a second cancel are
    refused; the running one still finishes."""
    running = api.post(
        "/v1/jobs",
        json={
            "type": "overinterpretation",
            "model": MODEL,
            "dataset_id": dataset.dataset_id,
            "class_name": "square",
            "gallery_images": 0,
        },
    )
    assert running.status_code == 202, running.text
    running_id = running.json()["job_id"]
    deadline = time.monotonic() + 60
    while api.get(f"/v1/jobs/{running_id}").json()["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queued = api.post(
        "/v1/jobs", json={"type": "evaluate", "model": MODEL, "dataset_id": dataset.dataset_id}
    )
    assert queued.status_code == 202, queued.text
    queued_id = queued.json()["job_id"]
    assert api.get(f"/v1/jobs/{queued_id}").json()["status"] == "queued"
    _error(api.get(f"/v1/jobs/{queued_id}/result"), 409, "job_not_finished")
    canceled = api.delete(f"/v1/jobs/{queued_id}")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled" and canceled.json()["type"] == "evaluate"
    _error(api.delete(f"/v1/jobs/{queued_id}"), 409, "job_ended")
    _error(api.get(f"/v1/jobs/{queued_id}/result"), 409, "job_not_finished")
    assert _wait(api, running_id)["status"] == "finished"
    assert api.get(f"/v1/jobs/{queued_id}").json()["status"] == "canceled"
    _error(api.get("/v1/jobs/" + "0" * 32), 404, "job_not_found")
    _error(api.delete("/v1/jobs/" + "0" * 32), 404, "job_not_found")


def test_no_torch_in_the_running_gateway_and_worker(image_stack: ImageStack) -> None:
    """After every route and job: the processes run the image venv's interpreter and its
    compiled modules, and no part of torch is mapped into them."""
    venv, development = str(image_stack.python.parents[1]), f"{sys.prefix}/"
    for process in (image_stack.gateway, image_stack.worker):
        assert process.running(), process.log_file.read_text()[-3000:]
        command = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert command[0].decode() == str(image_stack.python), command
        mapped = {
            line.split()[-1]
            for line in Path(f"/proc/{process.pid}/maps").read_text().splitlines()
            if "/" in line
        }
        ours = [path for path in mapped if path.startswith(venv) and "pydantic_core" in path]
        assert ours, process.name
        assert not [p for p in mapped if "torch" in p or p.startswith(development)], process.name
    for log in ("gateway.log", "worker.log"):
        text = (image_stack.state / "logs" / log).read_text(errors="replace")
        assert "ModuleNotFoundError" not in text and "Traceback" not in text, text[-3000:]

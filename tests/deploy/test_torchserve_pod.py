"""The TorchServe pod's two processes: ``python -m model_store.torchserve_process`` and the proxy.

The first test reads the chart's environment for the TorchServe container into the entry
point and checks the configuration it would run. The integration test runs both processes
for real, as the pod does (TorchServe with its pod-local token, the proxy in front with the
release-wide token), calls a model through the proxy with the gateway's own client, and
stops TorchServe with SIGTERM as the kubelet does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model_store.stack import free_port
from model_store.torchserve_process import TorchServeProcess, main
from protocol.contract import DescribeResult
from service.settings import Settings, get_settings
from service.torchserve_client import SyncTorchServeClient
from tests.deploy.conftest import containers, load_manifests, one

TOKEN = "release-wide-token-for-the-pod-test"


def test_container_environment_configures_torchserve(
    render, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    docs = load_manifests(render())
    container = containers(one(docs, "Deployment", "torchserve"))["torchserve"]
    config = one(docs, "ConfigMap", "config")["data"]
    for name in list(os.environ):
        if name.startswith("BEYOND_"):
            monkeypatch.delenv(name)
    for item in container["env"]:
        value = item.get("value") or config[item["valueFrom"]["configMapKeyRef"]["key"]]
        monkeypatch.setenv(item["name"], value)
    monkeypatch.setenv("BEYOND_STATE_DIR", str(tmp_path / "state"))
    store = tmp_path / "archives"
    store.mkdir()
    models = config["BEYOND_MODELS"].split(",")
    for model in models[:-1]:
        (store / f"{model}.mar").write_bytes(b"")
    get_settings.cache_clear()
    seen: list[TorchServeProcess] = []
    monkeypatch.setattr(TorchServeProcess, "run_foreground", lambda self: seen.append(self) or 0)
    try:
        with pytest.raises(SystemExit):  # one archive is missing: a clear error, no server
            main(["--model-store", str(store)])
        assert not seen
        (store / f"{models[-1]}.mar").write_bytes(b"")
        assert main(["--model-store", str(store)]) == 0
    finally:
        get_settings.cache_clear()
    (server,) = seen
    properties = dict(line.split("=", 1) for line in server.config_properties().splitlines())
    port = os.environ["BEYOND_TORCHSERVE_PORT"]
    assert properties["inference_address"] == f"http://127.0.0.1:{port}"
    management = os.environ["BEYOND_TORCHSERVE_MANAGEMENT_PORT"]
    assert properties["management_address"] == f"http://127.0.0.1:{management}"
    assert properties["load_models"] == ",".join(f"{m}.mar" for m in models)
    assert (
        properties["token_expiration_min"] == os.environ["BEYOND_TORCHSERVE_TOKEN_EXPIRATION_MIN"]
    )
    assert properties["default_workers_per_model"] == os.environ["BEYOND_TORCHSERVE_WORKERS"]
    # the proxy's key file is where this TorchServe writes it
    proxy = containers(one(docs, "Deployment", "torchserve"))["proxy"]
    key_file = next(e["value"] for e in proxy["env"] if e["name"] == "BEYOND_TORCHSERVE_KEY_FILE")
    chart_state = next(e["value"] for e in container["env"] if e["name"] == "BEYOND_STATE_DIR")
    assert server.key_file == tmp_path / "state" / "torchserve" / "key_file.json"
    assert key_file == f"{chart_state}/torchserve/key_file.json"


def _wait(url: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {timeout} s")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.integration
def test_pod_serves_through_the_proxy_and_stops_on_sigterm(tmp_path: Path) -> None:
    from model_store.build import ensure_demo_archives

    store = ensure_demo_archives()
    ports = {name: free_port() for name in ("inference", "management", "metrics", "proxy")}
    state = tmp_path / "state"
    base = {k: v for k, v in os.environ.items() if not k.startswith("BEYOND_")}
    ts_env = {
        **base,
        "BEYOND_MODELS": "shapes-resnet",
        "BEYOND_STATE_DIR": str(state),
        "BEYOND_TORCHSERVE_PORT": str(ports["inference"]),
        "BEYOND_TORCHSERVE_MANAGEMENT_PORT": str(ports["management"]),
        "BEYOND_TORCHSERVE_METRICS_PORT": str(ports["metrics"]),
        "BEYOND_TORCH_THREADS": "1",
    }
    key_file = state / "torchserve" / "key_file.json"
    proxy_env = {
        **base,
        "BEYOND_TORCHSERVE_URL": f"http://127.0.0.1:{ports['inference']}",
        "BEYOND_TORCHSERVE_KEY_FILE": str(key_file),
        "BEYOND_TORCHSERVE_TOKEN": TOKEN,
    }
    log = (tmp_path / "pod.log").open("ab")
    torchserve = subprocess.Popen(
        [sys.executable, "-m", "model_store.torchserve_process", "--model-store", str(store)],
        env=ts_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proxy_command = [sys.executable, "-m", "uvicorn", "--factory"]
    proxy_command += ["service.torchserve_proxy:app_from_env", "--host", "127.0.0.1"]
    proxy_command += ["--port", str(ports["proxy"])]
    proxy = subprocess.Popen(
        proxy_command, env=proxy_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proxy_url = f"http://127.0.0.1:{ports['proxy']}"
    try:
        _wait(f"{proxy_url}/readyz", 300, torchserve)
        settings = Settings(torchserve_url=proxy_url, torchserve_token=TOKEN)
        with SyncTorchServeClient(settings) as client:
            described = client.describe("shapes-resnet")
        assert isinstance(described, DescribeResult) and described.spec["name"] == "shapes-resnet"
        # TorchServe itself still wants its own token; the release token is not it
        direct = httpx.post(
            f"http://127.0.0.1:{ports['inference']}/predictions/shapes-resnet",
            json={"task": "describe"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert direct.status_code == 400 and direct.json()["type"] == "InvalidKeyException"
        assert json.loads(key_file.read_text())["inference"]["key"] != TOKEN
        refused = httpx.get(f"{proxy_url}/models", timeout=5)
        assert refused.status_code == 404
        # the container's probe: TorchServe's /ping with the token from the pod's key file
        probe = [sys.executable, "-m", "service.healthcheck", "torchserve"]
        assert subprocess.run(probe, env=ts_env, timeout=30).returncode == 0

        torchserve.send_signal(signal.SIGTERM)  # what the kubelet sends
        assert torchserve.wait(60) == 0
        deadline = time.monotonic() + 15
        while _group_alive(torchserve.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(torchserve.pid), "TorchServe's frontend or workers survived"
        assert not key_file.exists()
        assert httpx.get(f"{proxy_url}/readyz", timeout=5).status_code == 503
        assert subprocess.run(probe, env=ts_env, timeout=30).returncode == 1
    finally:
        # SIGTERM first: the entry point stops TorchServe's own process group itself
        for process in (proxy, torchserve):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            if _group_alive(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()

"""Two TorchServe instances on one host, started at once (as the tests beside a dev stack,
or two operators' stacks): each keeps its workers' sockets in its own state folder, and
stopping one leaves the other serving.

Before, Java's temp folder ignored the per-instance ``TMPDIR``: both put their workers'
sockets at ``/tmp/.ts.sock.9000`` and following, stopping one deleted the other's, and two
starting together could connect to each other's workers.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model_store.stack import free_port
from model_store.torchserve_process import TorchServeProcess

pytestmark = pytest.mark.integration
MODEL = "shapes-resnet"


def _describe(server: TorchServeProcess) -> httpx.Response:
    return httpx.post(
        f"{server.inference_url}/predictions/{MODEL}",
        json={"task": "describe"},
        headers={"Authorization": f"Bearer {server.inference_token()}"},
        timeout=30,
    )


def _sockets(folder: Path) -> set[str]:
    return {path.name for path in folder.glob(".ts.sock.*")}


def test_two_instances_share_no_socket_and_outlive_each_other(tmp_path: Path) -> None:
    from model_store.build import ensure_demo_archives

    store = ensure_demo_archives()
    before = _sockets(Path("/tmp"))
    servers = [
        TorchServeProcess(store, [f"{MODEL}.mar"], tmp_path / name, free_port(), free_port(), free_port())
        for name in ("first", "second")
    ]
    try:
        for server in servers:  # both starting at once
            server.launch(server.log_file)
        for server in servers:
            server.wait_ready(300)
        first, second = servers
        for server in servers:
            assert _sockets(server.state_dir / "tmp"), "no worker socket in the instance's temp folder"
        assert _sockets(Path("/tmp")) <= before  # nothing new in the host's /tmp
        assert _describe(first).status_code == _describe(second).status_code == 200

        first.stop()
        assert _sockets(second.state_dir / "tmp")
        for _ in range(3):
            reply = _describe(second)
            assert reply.status_code == 200, reply.text
            assert reply.json()["spec"]["name"] == MODEL
    finally:
        for server in servers:
            server.stop()

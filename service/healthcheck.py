"""Container health check: ``python -m service.healthcheck [gateway|worker|torchserve|proxy]``.

Exit status 0 when the named component is healthy, 1 when not; without a name the role is
read from the container's command line (PID 1), which is how the images' Docker
``HEALTHCHECK`` uses it. The chart's TorchServe probes run it too (``torchserve``):
TorchServe 0.12 wants its inference token even on ``/ping``, and that token exists only in
the pod (``<BEYOND_STATE_DIR>/torchserve/key_file.json``), so an ``httpGet`` probe cannot
carry it.

* gateway: ``GET /healthz`` on ``BEYOND_PORT``;
* proxy: ``GET /healthz`` on the ``--port`` of its command line (else ``BEYOND_PORT``);
* torchserve: ``GET /ping`` on ``BEYOND_TORCHSERVE_PORT`` with the pod's inference token
  (200 only when every model has a ready worker);
* worker: ``PING`` to ``BEYOND_REDIS_URL``.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROLES = ("gateway", "worker", "torchserve", "proxy")
TIMEOUT_S = 4.0


def role_from_command(command: Sequence[str]) -> str:
    """The component a container runs, from its command line (PID 1's)."""
    words = " ".join(command)
    if "model_store.torchserve_process" in words:
        return "torchserve"
    if "service.jobs.worker" in words:
        return "worker"
    if "service.torchserve_proxy" in words:
        return "proxy"
    return "gateway"


def _port_option(command: Sequence[str]) -> str | None:
    words = " ".join(command).split()
    if "--port" in words[:-1] and words[words.index("--port") + 1].isdigit():
        return words[words.index("--port") + 1]
    return None


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:  # noqa: S310
            return bool(reply.status == 200)
    except OSError:
        return False


def torchserve_healthy(env: dict[str, str]) -> bool:
    state = Path(env.get("BEYOND_STATE_DIR", "var")) / "torchserve" / "key_file.json"
    try:
        token = json.loads(state.read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    port = env.get("BEYOND_TORCHSERVE_PORT", "8080")
    return _http_ok(f"http://127.0.0.1:{port}/ping", {"Authorization": f"Bearer {token}"})


def redis_healthy(env: dict[str, str]) -> bool:
    from redis import Redis

    url = env.get("BEYOND_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        client = Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        return bool(client.ping())
    except Exception:
        return False


def healthy(role: str, env: dict[str, str], command: Sequence[str] = ()) -> bool:
    if role == "torchserve":
        return torchserve_healthy(env)
    if role == "worker":
        return redis_healthy(env)
    port = (_port_option(command) if role == "proxy" else None) or env.get("BEYOND_PORT", "8000")
    return _http_ok(f"http://127.0.0.1:{port}/healthz")


def _pid1_command() -> list[str]:
    try:
        raw = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = _pid1_command()
    role = args[0] if args else role_from_command(command)
    if role not in ROLES:
        sys.stderr.write(f"usage: python -m service.healthcheck [{'|'.join(ROLES)}]\n")
        return 2
    return 0 if healthy(role, dict(os.environ), command) else 1


if __name__ == "__main__":
    sys.exit(main())

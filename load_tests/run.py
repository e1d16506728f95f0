"""Headless load test: ``python -m load_tests.run [--users N] [--duration 60s] [--capacity]``.

1. Finds the gateway (``--url``, default ``http://BEYOND_HOST:BEYOND_PORT``), loopback only.
   When it does not answer ``/readyz``, starts the stack (``python -m model_store.stack up``)
   and stops it again at the end.
2. Runs Locust headless on ``load_tests/locustfile.py``: ``MixedUser`` for ``--duration``
   with ``--users`` (default), or, with ``--capacity``, ``PredictUser`` stepped through the
   offered rates of ``[capacity]`` in the config, ending on a low rate to check recovery.
3. Writes ``report.md``, ``report.json`` and ``latency.png`` (latency and throughput over
   time) to ``--out`` (default ``var/load/<time>-<mode>``): requests per second, p50/p95/p99
   per route, failures by status, capacity steps; prints the report.
4. Exits 1 when an objective of ``[objectives]`` in the config is missed (2 on a setup error).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from load_tests.report import build_report
from model_store.stack import ManagedProcess, wait_ready
from service.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "load_tests" / "config.toml"


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h30m`` -> seconds."""
    total, number = 0.0, ""
    units = {"h": 3600, "m": 60, "s": 1}
    for char in text.strip():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total += float(number) * units[char]
            number = ""
        else:
            raise ValueError(f"bad duration {text!r}")
    return total + (float(number) if number else 0.0)


def require_loopback(url: str) -> None:
    """Refuse any target that is not this machine's loopback interface."""
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise SystemExit(f"cannot resolve {host!r}") from None
    if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise SystemExit(f"refusing to load {url}: load tests target loopback addresses only")


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def start_stack(url: str, log: Path) -> ManagedProcess:
    """``python -m model_store.stack up`` in the background, on the URL's host and port."""
    parsed = urlparse(url)
    env = {**os.environ, "BEYOND_HOST": parsed.hostname or "127.0.0.1"}
    env["BEYOND_PORT"] = str(parsed.port or 80)
    stack = ManagedProcess(
        "stack", [sys.executable, "-m", "model_store.stack", "up"], log, env=env, cwd=REPO
    )
    print(f"no ready gateway at {url}: starting the stack (log: {log}) ...", flush=True)
    stack.start()
    wait_ready(url, 1200, check=stack)
    return stack


def api_key() -> str:
    key = os.environ.get("BEYOND_LOAD_API_KEY") or next(
        iter(get_settings().resolved_api_keys()), ""
    )
    if not key:
        raise SystemExit("no API key: set BEYOND_LOAD_API_KEY or BEYOND_API_KEYS")
    return key


def run_locust(
    url: str, out: Path, config_path: Path, users: int, spawn_rate: float,
    duration_s: float | None, steps: str | None, key: str,
) -> int:  # fmt: skip
    user_class = "PredictUser" if steps else "MixedUser"
    command = [
        sys.executable, "-m", "locust", "-f", str(REPO / "load_tests" / "locustfile.py"),
        "--headless", "--host", url, "--only-summary", "--stop-timeout", "10",
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip
    if not steps:
        command += ["-u", str(users), "-r", str(spawn_rate), "-t", f"{int(duration_s or 60)}s"]
    command.append(user_class)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "BEYOND_LOAD_CONFIG": str(config_path),
        "BEYOND_LOAD_API_KEY": key,
        "BEYOND_LOAD_SAMPLES": str(out / "samples.csv"),
    }
    if steps:
        env["BEYOND_LOAD_STEPS"] = steps
    else:
        env.pop("BEYOND_LOAD_STEPS", None)
    with open(out / "locust.log", "wb") as log:
        return subprocess.run(
            command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        ).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m load_tests.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--url", help="gateway URL (default: BEYOND_HOST/BEYOND_PORT)")
    parser.add_argument("--users", type=int, help="concurrent MixedUsers")
    parser.add_argument("--spawn-rate", type=float, help="users started per second")
    parser.add_argument("--duration", help="run time, e.g. 60s or 5m")
    parser.add_argument("--capacity", action="store_true", help="step PredictUser load instead")
    parser.add_argument("--steps", help="capacity steps rate:seconds,... (default: config)")
    parser.add_argument("--out", type=Path, help="report folder (default var/load/<time>-<mode>)")
    parser.add_argument(
        "--no-start", action="store_true", help="fail instead of starting the stack"
    )
    args = parser.parse_args(argv)

    config: dict[str, Any] = tomllib.loads(args.config.read_text())
    settings = get_settings()
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    require_loopback(url)
    mode = "capacity" if args.capacity else "mixed"
    out = args.out or settings.state_dir / "load" / f"{time.strftime('%Y%m%d-%H%M%S')}-{mode}"
    out.mkdir(parents=True, exist_ok=True)
    run = config["run"]
    users = args.users or int(run["users"])
    spawn_rate = args.spawn_rate or float(run["spawn_rate"])
    steps = (args.steps or config["capacity"]["steps"]) if args.capacity else None
    duration_s = (
        sum(float(part.split(":")[1]) for part in steps.split(","))
        if steps
        else parse_duration(args.duration or str(run["duration"]))
    )

    stack = None
    if not is_ready(url):
        if args.no_start:
            print(f"no ready gateway at {url}", file=sys.stderr)
            return 2
        stack = start_stack(url, out / "stack.log")
    try:
        key = api_key()
        load_before = os.getloadavg()
        print(f"{mode} load on {url} for {duration_s:.0f} s ...", flush=True)
        started = time.time()
        code = run_locust(url, out, args.config, users, spawn_rate, duration_s, steps, key)
        elapsed = time.time() - started
        if code != 0 or not (out / "samples.csv").exists():
            print(f"locust failed (exit {code}); see {out / 'locust.log'}", file=sys.stderr)
            return 2
    finally:
        if stack is not None:
            stack.stop()
    meta = {
        "target": url,
        "model": run["model"],
        "users": "stepped" if steps else users,
        "duration_s": round(duration_s, 1),
        "wall_s": round(elapsed, 1),
        "steps": steps or "-",
        "cores": os.cpu_count(),
        "load_average_before": " ".join(f"{v:.2f}" for v in load_before),
        "load_average_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    report = build_report(
        out / "samples.csv", out, duration_s, config["objectives"],
        config["capacity"] if steps else None, meta,
    )  # fmt: skip
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}")
    missed = [c["objective"] for c in report["objectives"] if not c["ok"]]
    if missed:
        print(f"objectives missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

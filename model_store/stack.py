"""The one command: ``python -m model_store.stack up`` (and ``down``).

``up`` starts, on the demo models: Redis (append-only file, ``appendfsync everysec``,
``noeviction``, data under ``<state>/redis``), TorchServe (``TorchServeProcess``), one RQ
worker with the scheduler, and the gateway (uvicorn); waits until ``/readyz`` is green;
prints the URL, the docs URL and the API key; and stops everything on Ctrl-C or SIGTERM.
``down`` (another terminal, or ``make down``) stops a running stack through its pid file
``<state>/stack.json``. Every child runs in its own process group, so stopping one stops
all of its children too. The process helpers here are reused by the integration tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from service.settings import Settings, ensure_api_key_file, get_settings

PID_FILE = "stack.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc), including those in other process groups
    (an RQ work horse calls ``setpgrp``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``timeout``
    (including descendants that left the group)."""
    family = descendants(pid)
    try:
        _stop_group(pid, timeout)
    finally:
        _kill_all([p for p in family if _alive(p)])


def _stop_group(pid: int, timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            continue
        try:  # the leader is gone; make sure no member of its group survives
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return


class ManagedProcess:
    """A child in its own session (process group), output appended to a log file."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_file: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_file = log_file
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> ManagedProcess:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None:
            stop_group(self.process.pid, timeout)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.process = None

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, for fault tests)."""
        if self.process is not None:
            family = descendants(self.process.pid)
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _kill_all(family)
            self.process.wait(10)
            self.process = None


def redis_config(port: int, data_dir: Path) -> str:
    """redis.conf for a server that does not lose work."""
    lines = [
        "bind 127.0.0.1",
        f"port {port}",
        "protected-mode yes",
        "daemonize no",
        f"dir {data_dir.resolve()}",
        "appendonly yes",
        "appendfsync everysec",
        'appendfilename "appendonly.aof"',
        "maxmemory-policy noeviction",
        "save 3600 1 300 100 60 10000",
        "dbfilename dump.rdb",
        "loglevel notice",
    ]
    return "\n".join(lines) + "\n"


class RedisServer(ManagedProcess):
    def __init__(self, port: int, state_dir: Path) -> None:
        self.port = port
        self.data_dir = state_dir / "redis"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "redis.conf"
        config.write_text(redis_config(port, self.data_dir))
        super().__init__("redis", ["redis-server", str(config)], state_dir / "logs" / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_ready(self, timeout: float = 30.0) -> None:
        from redis import Redis
        from redis.exceptions import BusyLoadingError, ConnectionError

        client = Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"redis-server exited; see {self.log_file}")
            try:
                if client.ping():
                    client.close()
                    return
            except (ConnectionError, BusyLoadingError, OSError):
                time.sleep(0.1)
        raise RuntimeError("redis-server did not answer in time")

    def start(self) -> RedisServer:
        super().start()
        self.wait_ready()
        return self


def service_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment of gateway and worker children: ours plus the stack's wiring."""
    env = {k: v for k, v in os.environ.items()}
    env.update({f"BEYOND_{k.upper()}": v for k, v in overrides.items()})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def worker_process(
    env: dict[str, str], log_file: Path, name: str = "worker", python: str = sys.executable
) -> ManagedProcess:
    return ManagedProcess(name, [python, "-m", "service.jobs.worker"], log_file, env=env)


def gateway_process(
    env: dict[str, str], host: str, port: int, log_file: Path, python: str = sys.executable
) -> ManagedProcess:
    command = [
        python,
        "-m",
        "uvicorn",
        "--factory",
        "service.gateway.app:app_from_env",
        "--host",
        host,
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        "5",
        "--no-server-header",
        "--log-level",
        "info",
    ]
    return ManagedProcess("gateway", command, log_file, env=env)


def wait_ready(
    base_url: str, timeout: float, check: ManagedProcess | None = None, path: str = "/readyz"
) -> None:
    """Poll ``base_url + path`` until it answers 200; fail early when ``check`` exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if check is not None and not check.running():
            raise RuntimeError(f"{check.name} exited; see {check.log_file}")
        try:
            reply = httpx.get(f"{base_url}{path}", timeout=5)
            if reply.status_code == 200:
                return
            last = reply.text
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise RuntimeError(f"{path} not green after {timeout:.0f} s: {last}")


def _child_running(proc: object) -> bool:
    check = getattr(proc, "running", None) or proc.is_running
    return bool(check())


def _write_pids(state_dir: Path, processes: dict[str, int]) -> None:
    (state_dir / PID_FILE).write_text(json.dumps(processes))


def down(settings: Settings) -> int:
    pid_file = settings.state_dir / PID_FILE
    try:
        pids = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        print("no running stack found")
        return 0
    for name in ("gateway", "worker", "torchserve", "redis"):
        if name in pids:
            stop_group(int(pids[name]))
            print(f"stopped {name}")
    pid_file.unlink(missing_ok=True)
    return 0


def up(settings: Settings, ready_timeout: float = 900.0) -> int:
    from model_store.build import ensure_demo_archives
    from model_store.torchserve_process import TorchServeProcess

    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    if (state / PID_FILE).exists():
        down(settings)
    generated_key = ensure_api_key_file(settings)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    children: list[tuple[str, object]] = []
    generating: list[ManagedProcess] = []  # one-off helpers, not watched: they end by themselves
    try:
        clock = time.monotonic()

        def step(message: str) -> None:
            print(f"[{time.monotonic() - clock:5.1f} s] {message}", flush=True)

        step("archiving the demo models (shipped weights; a few seconds each, cached) ...")
        archives = ensure_demo_archives(report=lambda name: step(f"  archived {name}"))
        redis = RedisServer(int(os.environ.get("BEYOND_REDIS_PORT", "6379")), state).start()
        children.append(("redis", redis))
        step(f"redis ready at {redis.url}")
        ts = TorchServeProcess(
            archives,
            [f"{m}.mar" for m in settings.models],
            state / "torchserve",
            inference_port=int(os.environ.get("BEYOND_TORCHSERVE_PORT", "8080")),
            management_port=int(os.environ.get("BEYOND_TORCHSERVE_MANAGEMENT_PORT", "8081")),
            metrics_port=int(os.environ.get("BEYOND_TORCHSERVE_METRICS_PORT", "8082")),
        )
        step(f"starting TorchServe with {len(settings.models)} models (log: {ts.log_file}) ...")
        ts.start(timeout=600, on_ready=lambda name: step(f"  model {name} ready"))
        children.append(("torchserve", ts))
        env = service_env(
            settings,
            redis_url=redis.url,
            torchserve_url=ts.inference_url,
            torchserve_key_file=str(ts.key_file),
            state_dir=str(state),
        )
        worker = worker_process(env, state / "logs" / "worker.log").start()
        children.append(("worker", worker))
        gateway = gateway_process(
            env, settings.host, settings.port, state / "logs" / "gateway.log"
        ).start()
        children.append(("gateway", gateway))
        _write_pids(state, {name: proc.process.pid for name, proc in children})  # type: ignore[attr-defined]
        base = f"http://{settings.host}:{settings.port}"
        step("starting the job worker and the gateway ...")
        wait_ready(base, ready_timeout, check=gateway)
        step("gateway ready")
        # the demo datasets (the README's examples use their images) are not needed to serve:
        # generated after the first answer can be given, at a lower priority
        datasets: ManagedProcess | None = ManagedProcess(
            "datasets", ["nice", "-n", "10", sys.executable, "-m", "model_store.train", "--datasets"],
            state / "logs" / "datasets.log",
        ).start()
        generating.append(datasets)
        key = generated_key or "(from BEYOND_API_KEYS)"
        print(
            f"\nBeyond is ready\n  URL:      {base}\n  docs:     {base}/docs\n  API key:  {key}\n"
            f"  logs:     {state / 'logs'}\nCtrl-C (or `python -m model_store.stack down`) stops it.\n",
            flush=True,
        )
        step("generating the demo datasets under model_store/data in the background (first run: about 30 s) ...")
        while all(_child_running(proc) for _, proc in children):
            if datasets is not None and not datasets.running():
                step("demo datasets ready" if datasets.process.returncode == 0  # type: ignore[union-attr]
                     else f"the demo datasets failed; see {datasets.log_file}")
                datasets = None
            time.sleep(1)
        print("a component exited; stopping the stack", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for helper in generating:
            helper.stop()
        for name, proc in reversed(children):
            proc.stop()  # type: ignore[attr-defined]
            print(f"stopped {name}", flush=True)
        (state / PID_FILE).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_store.stack", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    settings = get_settings()
    return up(settings) if args.command == "up" else down(settings)


if __name__ == "__main__":
    sys.exit(main())

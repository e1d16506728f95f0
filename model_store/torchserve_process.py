"""Start, wait for and stop a local TorchServe (it runs the server; torch stays in its workers).

The configuration closes TorchServe down to what the gateway needs:

* inference, management and metrics APIs bound to 127.0.0.1;
* token authorization on; the tokens live in ``key_file.json`` in the state folder, which
  the gateway and workers read (``inference_token()``), and expire after
  ``token_expiration_min`` (default 365 days: TorchServe 0.12 cannot be given a token, and an expired one is refused until a restart; clients re-read the file when it changes);
* the model API (registering models after start-up) off, ``allowed_urls`` limited to the
  local model store;
* request/response caps raised from TorchServe's 6.5 MB to ``max_message_mb`` (default
  :data:`MAX_MESSAGE_MB`) so that the gateway's largest image fits as raw pixels in a frame
  and full-resolution explanations fit in a reply.

Each instance gets its own state folder, its temp folder too (``TMPDIR`` for the pid file,
``TEMP`` for Java, where the workers' sockets go), so several can run side by side (tests
next to a dev stack) without sharing a file.

``python -m model_store.torchserve_process`` runs the same configuration in the foreground: the
TorchServe container's command (docs/deploy.md), where a proxy beside it in the pod is the
only way in (``service.torchserve_proxy``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from protocol.frames import MAX_MESSAGE_MB


class TorchServeError(RuntimeError):
    """TorchServe did not start or its models did not become ready."""


def torchserve_executable() -> str:
    """The ``torchserve`` script beside the running interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / "torchserve"
    found = str(candidate) if candidate.exists() else shutil.which("torchserve")
    if not found:
        raise TorchServeError("torchserve is not installed in this environment")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TorchServeProcess:
    """One TorchServe server with a set of archives from a local model store."""

    def __init__(
        self,
        model_store: Path,
        models: list[str],
        state_dir: Path,
        inference_port: int = 8080,
        management_port: int = 8081,
        metrics_port: int = 8082,
        workers: int = 1,
        job_queue_size: int = 100,
        max_message_mb: int = MAX_MESSAGE_MB,
        token_expiration_min: int = 525600,
        torch_threads: int | None = None,
    ) -> None:
        self.model_store = model_store.resolve()
        self.models = models
        self.state_dir = state_dir.resolve()
        self.inference_port = inference_port
        self.management_port = management_port
        self.metrics_port = metrics_port
        # gRPC is unused but always opened (7070/7071 by default): free ports keep several
        # servers (tests beside a dev stack, benchmarks) from colliding
        self.grpc_ports = (_free_port(), _free_port())
        self.workers = workers
        self.job_queue_size = job_queue_size
        self.max_message_bytes = max_message_mb * 1024 * 1024
        self.token_expiration_min = token_expiration_min
        self.torch_threads = torch_threads
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "key_file.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "torchserve.out"

    def config_properties(self) -> str:
        store = re.escape(self.model_store.as_posix())
        lines = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            "grpc_inference_port": str(self.grpc_ports[0]),
            "grpc_management_port": str(self.grpc_ports[1]),
            "model_store": self.model_store.as_posix(),
            "load_models": ",".join(self.models),
            "allowed_urls": f"file://{store}/.*",
            "enable_model_api": "false",
            "disable_token_authorization": "false",
            "token_expiration_min": str(self.token_expiration_min),
            "default_workers_per_model": str(self.workers),
            "job_queue_size": str(self.job_queue_size),
            "max_request_size": str(self.max_message_bytes),
            "max_response_size": str(self.max_message_bytes),
            "install_py_dep_per_model": "false",
            "disable_system_metrics": "true",
            "enable_envvars_config": "false",
        }
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def start(self, timeout: float = 300, on_ready: Callable[[str], None] | None = None) -> None:
        """Start TorchServe and block until every model has a ready worker; ``on_ready``
        hears each model's name as it becomes ready."""
        self.launch(self.log_file)
        try:
            self.wait_ready(timeout, on_ready)
        except Exception:
            self.stop()
            raise

    def launch(self, log_file: Path | None) -> None:
        """Write the config and start TorchServe without waiting (output to ``log_file``,
        or to this process's own stdout when ``None``)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "tmp").mkdir(exist_ok=True)
        config = self.state_dir / "config.properties"
        config.write_text(self.config_properties())
        self.key_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "TMPDIR": str(self.state_dir / "tmp"),
            # TorchServe passes TEMP on as java.io.tmpdir, where its frontend puts the model
            # workers' sockets (.ts.sock.<port>); Java ignores TMPDIR, so without it every
            # instance on a host would share /tmp and stop or reach the others' workers
            "TEMP": str(self.state_dir / "tmp"),
            "LOG_LOCATION": str(self.state_dir / "logs"),
            "METRICS_LOCATION": str(self.state_dir / "logs"),
        }
        if self.torch_threads:
            env["BEYOND_TORCH_THREADS"] = str(self.torch_threads)
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        command = [
            torchserve_executable(),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(config),
            "--model-store",
            str(self.model_store),
        ]
        log = open(log_file, "ab") if log_file else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command,
                cwd=self.state_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log is not None:
                log.close()

    def run_foreground(self, grace_s: float = 30) -> int:
        """Run until TorchServe exits (its status) or SIGTERM/SIGINT stops it (0)."""

        def on_signal(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.launch(None)
        assert self.process is not None
        try:
            return self.process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            self.stop(grace_s)

    def inference_token(self) -> str:
        """The current inference token from ``key_file.json``."""
        return json.loads(self.key_file.read_text())["inference"]["key"]

    def management_token(self) -> str:
        return json.loads(self.key_file.read_text())["management"]["key"]

    def wait_ready(self, timeout: float, on_ready: Callable[[str], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = [Path(m).stem for m in self.models]
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TorchServeError(
                    f"torchserve exited with {self.process.returncode}; see {self.log_file}"
                )
            if self.key_file.exists():
                ready = [m for m in pending if self._model_ready(m)]
                for model in ready:
                    if on_ready is not None:
                        on_ready(model)
                pending = [m for m in pending if m not in ready]
                if not pending:
                    return
            time.sleep(0.5)
        raise TorchServeError(
            f"models not ready after {timeout:.0f} s: {pending}; see {self.log_file}"
        )

    def _model_ready(self, model: str) -> bool:
        try:
            reply = httpx.get(
                f"{self.management_url}/models/{model}",
                headers={"Authorization": f"Bearer {self.management_token()}"},
                timeout=5,
            )
            workers = reply.json()[0]["workers"] if reply.status_code == 200 else []
        except (httpx.HTTPError, ValueError, KeyError, IndexError, json.JSONDecodeError):
            return False
        return any(w.get("status") == "READY" for w in workers)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """Stop TorchServe, its Java frontend and its Python workers (the whole session)."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                # the frontend's workers share the session; make sure none is left
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        self.process = None
        self.key_file.unlink(missing_ok=True)

    def __enter__(self) -> TorchServeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def main(argv: list[str] | None = None) -> int:
    """``python -m model_store.torchserve_process``: TorchServe in the foreground (containers).

    Defaults come from the environment, with the names the local stack uses
    (``BEYOND_TORCHSERVE_PORT`` ...) plus the settings' ``BEYOND_MODELS`` and
    ``BEYOND_STATE_DIR`` and the model store's ``BEYOND_MODEL_STORE_DIR``.
    """
    from model_store import paths
    from service.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="python -m model_store.torchserve_process", description=main.__doc__
    )
    parser.add_argument("--model-store", type=Path, default=paths.ARCHIVE_DIR)
    parser.add_argument("--models", default=",".join(settings.models))
    parser.add_argument("--state-dir", type=Path, default=settings.state_dir / "torchserve")
    parser.add_argument("--port", type=int, default=_env_int("BEYOND_TORCHSERVE_PORT", 8080))
    parser.add_argument(
        "--management-port", type=int, default=_env_int("BEYOND_TORCHSERVE_MANAGEMENT_PORT", 8081)
    )
    parser.add_argument(
        "--metrics-port", type=int, default=_env_int("BEYOND_TORCHSERVE_METRICS_PORT", 8082)
    )
    parser.add_argument("--workers", type=int, default=_env_int("BEYOND_TORCHSERVE_WORKERS", 1))
    parser.add_argument(
        "--token-expiration-min",
        type=int,
        default=_env_int("BEYOND_TORCHSERVE_TOKEN_EXPIRATION_MIN", 10080),
    )
    parser.add_argument("--torch-threads", type=int, default=_env_int("BEYOND_TORCH_THREADS", 0))
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    missing = [m for m in models if not (args.model_store / f"{m}.mar").is_file()]
    if missing:
        parser.error(
            f"no archive for {missing} in {args.model_store} (python -m model_store.build)"
        )
    server = TorchServeProcess(
        args.model_store,
        [f"{m}.mar" for m in models],
        args.state_dir,
        inference_port=args.port,
        management_port=args.management_port,
        metrics_port=args.metrics_port,
        workers=args.workers,
        token_expiration_min=args.token_expiration_min,
        torch_threads=args.torch_threads or None,
    )
    return server.run_foreground()


if __name__ == "__main__":
    sys.exit(main())

"""How the job tier scales: one 10,000-image dataset job with 1, 2 and 4 RQ workers.

    python -m benchmarks.scale            # a latency-bound fake model server (50 ms a call)
    python -m benchmarks.scale --real     # the real TorchServe, two workers per model

It starts what it measures on free ports (nothing else need run): a redis-server, the model
server and one RQ worker process per worker counted (``python -m service.jobs.worker``),
stores a generated dataset through ``service.datasets.DatasetStore``, submits the job
through the gateway app (in this process) and times it from ``POST /v1/jobs`` to its
result, the workers started and registered before the clock starts. The job fans out into
``--chunk-images`` chunks (``BEYOND_CHUNK_IMAGES``; the default, 1,250, makes 8 chunks of
the 10,000 images, an equal share for 1, 2 and 4 workers); one more run with fan-out off
(``BEYOND_CHUNK_IMAGES=0``) on one worker gives its cost. Every run must give the first
run's result (times aside). Prints a markdown table with the speed-up over one worker.

Fake setup: ``tests/unit/fake_torchserve`` answering every call after ``--delay-ms``
(``asyncio.sleep``, so that the cores are not what is measured); an ``apem`` job by
default (8 images a call: 1,250 calls). Real setup: TorchServe with the demo archive of
``shapes-resnet`` (``model_store/archives``, which ``make up`` builds; two single-threaded
workers, as archived) on generated demo images; an ``evaluate`` job by default (32 images
a call): on CPU cores, more RQ workers than TorchServe workers cannot help.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis
from rq import Queue, Worker

from benchmarks.markdown import table
from model_store.stack import (
    ManagedProcess,
    RedisServer,
    free_port,
    service_env,
    wait_ready,
    worker_process,
)
from service.datasets import DatasetStore
from service.gateway.app import create_app
from service.jobs import queue as jobq
from service.settings import Settings

KEY = "scale-benchmark-key-0123456789"
MODEL = "shapes-resnet"
JOBS = {
    "apem": {"type": "apem", "method": "gradient"},
    "evaluate": {"type": "evaluate"},
}


def cpu_name() -> str:
    """The CPU's model name (``lscpu``'s), from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def colour_archive(n: int) -> bytes:
    """``n`` small images of the fake's three classes, each its own colour (the fake's
    answers follow the red level)."""
    labels = ("circle", "square", "triangle")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(n):
            png = io.BytesIO()
            Image.new("RGB", (8, 8), (i % 256, i // 256 % 256, 7 * i % 256)).save(png, format="PNG")
            archive.writestr(f"{labels[i % 3]}/{i:05d}.png", png.getvalue())
    return out.getvalue()


def shapes_archive(n: int, root: Path) -> bytes:
    """``n`` generated demo test images (``model_store.shapes``, seed 0) in their classes."""
    from model_store.shapes import ShapesConfig, generate
    from service.client import folder_archive

    split = generate(ShapesConfig(sizes={"test": n}), root / "shapes") / "test"
    for extra in ("metadata.jsonl", "core_masks.npy", "spurious_masks.npy"):
        (split / extra).unlink(missing_ok=True)
    return folder_archive(split)


@contextmanager
def fake_model_server(state: Path, delay_ms: float) -> Iterator[tuple[str, Path]]:
    """The fake TorchServe in its own process; its URL and key file."""
    from tests.unit.fake_torchserve import TOKEN

    port = free_port()
    command = [sys.executable, "-m", "benchmarks.scale", "--serve-fake", str(port), "--delay-ms", str(delay_ms)]
    server = ManagedProcess("model-server", command, state / "logs" / "model-server.log").start()
    key_file = state / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": TOKEN}}))
    try:
        wait_ready(f"http://127.0.0.1:{port}", 60, check=server, path="/ping")
        yield f"http://127.0.0.1:{port}", key_file
    finally:
        server.stop()


@contextmanager
def real_model_server(state: Path) -> Iterator[tuple[str, Path]]:
    """TorchServe with the demo archive of ``MODEL``; its URL and key file."""
    from model_store import paths
    from model_store.torchserve_process import TorchServeProcess

    if not (paths.ARCHIVE_DIR / f"{MODEL}.mar").exists():
        raise SystemExit(f"no {paths.ARCHIVE_DIR / MODEL}.mar: run `make up` (or python -m model_store.build --demo)")
    server = TorchServeProcess(
        paths.ARCHIVE_DIR, [f"{MODEL}.mar"], state / "torchserve", free_port(), free_port(), free_port()
    )
    server.start(timeout=600)
    try:
        yield server.inference_url, server.key_file
    finally:
        server.stop()


def serve_fake(port: int, delay_ms: float) -> None:
    """``--serve-fake``: run the fake TorchServe, each answer ``delay_ms`` late."""
    import uvicorn

    from tests.unit import fake_torchserve

    fake_torchserve.State.delay_s = delay_ms / 1000
    uvicorn.run(fake_torchserve.app, host="127.0.0.1", port=port, log_level="warning")


@contextmanager
def workers(env: dict[str, str], count: int, redis: Redis, settings: Settings, logs: Path) -> Iterator[None]:
    """``count`` RQ worker processes, registered on the queue before this returns."""
    started = [worker_process(env, logs / f"worker-{k}.log", name=f"worker-{k}").start() for k in range(count)]
    try:
        queue = Queue(settings.queue_name, connection=redis)
        deadline = time.monotonic() + 120
        while Worker.count(queue=queue) < count:
            if time.monotonic() > deadline or not all(w.running() for w in started):
                raise SystemExit(f"the workers did not start; see {logs}")
            time.sleep(0.1)
        yield
    finally:
        for worker in started:
            worker.stop()


def timed_job(gateway: TestClient, job: dict[str, Any], redis: Redis, settings: Settings) -> tuple[float, dict[str, Any], int]:
    """Seconds from submission to result, the result (its time aside) and the job's chunks."""
    start = time.perf_counter()
    reply = gateway.post("/v1/jobs", json=job)
    if reply.status_code != 202:
        raise SystemExit(f"the job was refused: {reply.text}")
    job_id = reply.json()["job_id"]
    while (status := gateway.get(f"/v1/jobs/{job_id}").json())["status"] not in ("finished", "failed", "canceled"):
        time.sleep(0.05)
    result = gateway.get(f"/v1/jobs/{job_id}/result").json()
    seconds = time.perf_counter() - start
    if status["status"] != "finished":
        raise SystemExit(f"the job {status['status']}: {status['error']}")
    chunks = len(jobq.fetch(redis, settings, job_id).meta.get("chunks", []))
    return seconds, {k: v for k, v in result.items() if k != "elapsed_ms"}, chunks


def measure(args: argparse.Namespace, state: Path) -> list[list[object]]:
    """One row per run: setup, workers, chunk size, chunks, seconds, images/s, speed-up."""
    setup = "real TorchServe (2 workers)" if args.real else f"fake, {args.delay_ms:g} ms a call"
    with ExitStack() as stack:
        redis_server = RedisServer(free_port(), state).start()
        stack.callback(redis_server.stop)
        server = real_model_server(state) if args.real else fake_model_server(state, args.delay_ms)
        url, key_file = stack.enter_context(server)
        base = Settings(
            api_keys=KEY, state_dir=state, redis_url=redis_server.url, torchserve_url=url,
            torchserve_key_file=key_file, models=MODEL, queue_name="scale",
        )
        env = service_env(base, redis_url=base.redis_url, torchserve_url=url, torchserve_key_file=str(key_file),
                          state_dir=str(state), models=MODEL, queue_name=base.queue_name)  # fmt: skip
        archive = shapes_archive(args.images, state) if args.real else colour_archive(args.images)
        dataset = DatasetStore(base).ingest(io.BytesIO(archive))["dataset_id"]
        job = {**JOBS[args.job], "model": MODEL, "dataset_id": dataset, "max_images": args.images}
        redis = stack.enter_context(closing(Redis.from_url(base.redis_url)))
        runs = [(1, 0)] + [(count, args.chunk_images) for count in args.workers]
        rows, expected, one = [], None, None
        for count, chunk_images in runs:
            settings = base.model_copy(update={"chunk_images": chunk_images})
            with workers(env, count, redis, settings, state / "logs"), \
                    TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as gateway:  # fmt: skip
                seconds, result, chunks = timed_job(gateway, job, redis, settings)
            if expected is not None and result != expected:
                raise SystemExit(f"{count} workers gave another result than the first run")
            expected = expected or result
            one = seconds if count == 1 and chunk_images else one
            speed_up = f"{one / seconds:.2f}x" if chunk_images and one else "-"
            rows.append([setup, count, chunk_images or "off", chunks or 1, seconds, args.images / seconds, speed_up])
            print(f"  {count} worker(s), chunks of {chunk_images or 'all'}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the real TorchServe (needs model_store/archives)")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--chunk-images", type=int, default=1250, help="BEYOND_CHUNK_IMAGES of the fanned-out runs")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="the fake's delay per call")
    parser.add_argument("--job", choices=sorted(JOBS), help="default: apem (fake), evaluate (real)")
    parser.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake(args.serve_fake, args.delay_ms)
        return
    args.job = args.job or ("evaluate" if args.real else "apem")
    with tempfile.TemporaryDirectory(prefix="beyond-scale-") as tmp:
        rows = measure(args, Path(tmp))
    title = (f"`{args.job}` job over {args.images:,} images, `{MODEL}`; {cpu_name()}, {os.cpu_count()} cores "
             f"(`python -m benchmarks.scale{' --real' if args.real else ''}`)")
    table(title, ["setup", "RQ workers", "BEYOND_CHUNK_IMAGES", "chunks", "seconds", "images/s", "speed-up vs 1 worker"], rows)


if __name__ == "__main__":
    main()

"""Predict throughput and latency, side by side on one model and one machine.

Three arms in one run, each at several client concurrencies; ``gateway`` and ``direct``
share one TorchServe and take turns (``--rounds`` slices per level), ``stock`` runs after:

* ``gateway``: multipart 256x256 JPEG to the gateway (decode, validate, PNG, TorchServe);
* ``direct``: straight to TorchServe and our handler, with the body the gateway would send
  (a binary frame of the decoded pixels, ``protocol.frames``);
* ``direct-json`` (not by default): the same as a JSON client sends it, base64 PNG inside;
* ``stock``: the JPEG to TorchServe's stock ``image_classifier`` handler with TorchServe's
  defaults (no model config: one request per batch, the default worker count, torch's
  default threads).

Both TorchServe models are torchvision resnet18 with random weights, 224x224 after resize
256 and center crop. Our archive comes from ``python -m model_store.build --random-weights``
with the batch size, batch delay and workers given here; the stock archive is built in a
temporary folder (``model.py`` + state dict, ``--handler image_classifier``). Every request
is closed-loop: each of ``c`` clients sends its next request when the last one answered.

    python benchmarks/serving.py                        # the table of docs/performance.md
    python benchmarks/serving.py --sweep 1x2:1/0,1x2:8/5,2x1:8/5 --arms direct
                                                        # choose workers x threads:batch/delay
    python benchmarks/serving.py --split-cores 1 --workers 1 --arms gateway,direct
                                                        # TorchServe and gateway apart
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image, ImageDraw

from model_store.stack import free_port, gateway_process, wait_ready
from model_store.torchserve_process import TorchServeProcess
from protocol.contract import PredictRequest, RawImage
from protocol.frames import MEDIA_TYPE, encode_request
from service.imaging import decode_image, decode_rgb

MODEL = "rn18-random"
STOCK = "rn18-stock"
API_KEY = "benchmark-key-0123456789abcdef"
STOCK_MODEL_PY = '''"""torchvision resnet18 for TorchServe's eager-mode loader (one class in this file)."""
from torchvision.models.resnet import BasicBlock, ResNet


class ImageClassifier(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2])
'''


@dataclass(frozen=True)
class ServeConfig:
    """Our archive's model config and TorchServe's process settings."""

    # chosen from measurements on two cores (docs/performance.md): two single-threaded
    # workers, batches of up to 8 collected for at most 5 ms
    workers: int = 2
    torch_threads: int = 1
    batch_size: int = 8
    max_batch_delay_ms: int = 5

    @classmethod
    def parse(cls, text: str) -> ServeConfig:
        """``WxT:B/D``: workers x torch threads : batch size / batch delay (ms)."""
        shape, _, batching = text.partition(":")
        workers, _, threads = shape.partition("x")
        batch, _, delay = batching.partition("/")
        return cls(int(workers), int(threads), int(batch), int(delay or 0))

    def label(self) -> str:
        return f"{self.workers}x{self.torch_threads}:{self.batch_size}/{self.max_batch_delay_ms}"


@dataclass
class Measurement:
    arm: str
    config: str
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per request by role


# --------------------------------------------------------------------------- inputs
def sample_jpeg(size: int = 256) -> bytes:
    """A deterministic photo-like 256x256 JPEG: smooth gradients, noise and a few shapes."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 50, 140, 150), fill=(220, 40, 40))
    draw.rectangle((150, 120, 230, 220), fill=(30, 160, 60))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def frame_body(jpeg: bytes) -> bytes:
    """What the gateway sends TorchServe for this JPEG: a frame with its decoded pixels."""
    rgb = decode_rgb(jpeg, 10**8).rgb
    raw = RawImage(width=rgb.width, height=rgb.height, pixels=rgb.tobytes())
    return encode_request(PredictRequest(image=raw, top_k=5))[0]


def json_body(jpeg: bytes) -> bytes:
    """A JSON client's body for this JPEG: base64 of its canonical PNG inside the JSON."""
    b64 = base64.b64encode(decode_image(jpeg, 10**8).png).decode()
    return PredictRequest(image=b64, top_k=5).model_dump_json().encode()


# --------------------------------------------------------------------------- archives
def build_ours(out: Path, config: ServeConfig) -> Path:
    command = [
        sys.executable, "-m", "model_store.build", "--name", MODEL, "--arch", "resnet18",
        "--random-weights", "--out", str(out), "--batch-size", str(config.batch_size),
        "--max-batch-delay", str(config.max_batch_delay_ms), "--workers", str(config.workers),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return out


def build_stock(out: Path) -> Path:
    """TorchServe's stock ``image_classifier`` on resnet18 with random weights, no config."""
    import torch
    import torchvision

    work = out / "src"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), work / "weights.pth")
    (work / "model.py").write_text(STOCK_MODEL_PY)
    labels = {str(i): f"class_{i}" for i in range(1000)}
    (work / "index_to_name.json").write_text(json.dumps(labels))
    command = [
        sys.executable, "-m", "model_archiver.model_packaging", "--model-name", STOCK,
        "--version", "1.0", "--model-file", str(work / "model.py"),
        "--serialized-file", str(work / "weights.pth"), "--handler", "image_classifier",
        "--extra-files", str(work / "index_to_name.json"), "--export-path", str(out), "--force",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return out


class StockTorchServe(TorchServeProcess):
    """TorchServe with its default worker count (ours pins one per model by default)."""

    def config_properties(self) -> str:
        lines = super().config_properties().splitlines(keepends=True)
        return "".join(line for line in lines if not line.startswith("default_workers_per_model"))


@contextmanager
def torchserve(server: TorchServeProcess) -> Iterator[TorchServeProcess]:
    saved = {
        k: os.environ.pop(k) for k in ("OMP_NUM_THREADS", "BEYOND_TORCH_THREADS") if k in os.environ
    }
    try:
        server.start(timeout=300)
        yield server
    finally:
        server.stop()
        os.environ.update(saved)


def torchserve_settings(server: TorchServeProcess) -> dict[str, str]:
    """The gateway's settings that point it at ``server``."""
    return {
        "BEYOND_TORCHSERVE_URL": server.inference_url,
        "BEYOND_TORCHSERVE_KEY_FILE": str(server.key_file),
    }


@contextmanager
def gateway(
    torchserve: dict[str, str], state: Path, max_inflight: int, model: str = MODEL
) -> Iterator[str]:
    """The gateway on a free port, serving ``model`` from the TorchServe that the
    ``BEYOND_TORCHSERVE_*`` settings in ``torchserve`` name; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        **torchserve,
        "BEYOND_API_KEYS": API_KEY,
        "BEYOND_MODELS": model,
        "BEYOND_STATE_DIR": str(state),
        "BEYOND_TORCHSERVE_MAX_CONNECTIONS": str(max_inflight),
        "BEYOND_MAX_INFLIGHT_PREDICT": str(max_inflight),
        "BEYOND_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # predict never uses Redis
    }
    process = gateway_process(env, "127.0.0.1", port, state / "gateway.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 60, check=process, path="/healthz")  # /readyz would want Redis
        yield base
    finally:
        process.stop()


# --------------------------------------------------------------------------- load
RequestFactory = Callable[[], dict[str, object]]


ROLES = {
    "gateway": "service.gateway.app",
    "ts-frontend": "org.pytorch.serve",
    "ts-workers": "model_service_worker",
}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process (the load generator: ``client``) and by its
    descendants, grouped by role (what their command lines hold, :data:`ROLES`)."""
    me = psutil.Process()
    times = me.cpu_times()
    totals = dict.fromkeys([*ROLES, "client"], 0.0)
    totals["client"] = times.user + times.system
    for child in me.children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            times = child.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        for role, marker in ROLES.items():
            if marker in command:
                totals[role] += times.user + times.system
    return totals


@dataclass
class Slice:
    """One closed-loop run: what the window saw."""

    latencies: list[float]
    errors: int
    window_s: float
    completed: int = 0  # replies that arrived inside the window, whenever sent
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU used inside the window


async def closed_loop(
    url: str,
    request: RequestFactory,
    headers: dict[str, str],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> Slice:
    """``concurrency`` clients back to back; latencies (s), errors and CPU inside the window."""
    latencies: list[float] = []
    errors = completed = 0
    cpu: list[dict[str, float]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        window_start, window_end = start + warmup_s, start + warmup_s + duration_s

        async def cpu_at_window_edges() -> None:
            for edge in (window_start, window_end):
                await asyncio.sleep(max(0.0, edge - time.perf_counter()))
                cpu.append(cpu_seconds())

        async def one_client() -> None:
            nonlocal errors, completed
            while True:
                sent = time.perf_counter()
                if sent >= window_end:
                    return
                try:
                    reply = await client.post(url, **request())  # type: ignore[arg-type]
                    ok = reply.status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                completed += window_start <= done <= window_end
                if sent >= window_start and done <= window_end:
                    if ok:
                        latencies.append(done - sent)
                    else:
                        errors += 1

        await asyncio.gather(cpu_at_window_edges(), *(one_client() for _ in range(concurrency)))
    used = {role: cpu[1][role] - cpu[0][role] for role in cpu[0]}
    return Slice(latencies, errors, duration_s, completed, used)


def summarise(arm: str, config: str, c: int, parts: list[Slice]) -> Measurement:
    latencies = [t for part in parts for t in part.latencies]
    window = sum(part.window_s for part in parts)
    completed = sum(part.completed for part in parts)
    ms = np.array(latencies or [float("nan")]) * 1000
    cpu_ms = {
        role: round(1000 * sum(part.cpu_s.get(role, 0.0) for part in parts) / completed, 2)
        for role in (*ROLES, "client")
    } if completed else {}  # fmt: skip
    return Measurement(
        arm, config, c, len(latencies), sum(part.errors for part in parts),
        round(len(latencies) / window, 2), round(float(np.percentile(ms, 50)), 1),
        round(float(np.percentile(ms, 95)), 1), round(float(np.percentile(ms, 99)), 1), cpu_ms,
    )  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One arm's endpoint: where to send, what, with which headers."""

    arm: str
    url: str
    request: RequestFactory
    headers: dict[str, str]


def run_levels(
    targets: list[Target],
    config: str,
    levels: list[int],
    warmup_s: float,
    duration_s: float,
    rounds: int = 1,
) -> list[Measurement]:
    """Every target at every level; with ``rounds > 1`` the targets take turns.

    Each (level, target) pair is measured in ``rounds`` slices of ``duration_s / rounds``
    (warm-up ``warmup_s / rounds`` each), round by round, so a drift of the machine's speed
    during the run (a shared machine drifts within minutes: docs/performance.md) hits every arm alike
    instead of whichever ran last.
    """
    for target in targets:  # prime the server (first passes allocate and tune), not counted
        asyncio.run(closed_loop(target.url, target.request, target.headers,
                                min(8, max(levels)), 0.0, max(warmup_s, 3.0)))  # fmt: skip
    slices: dict[tuple[str, int], list[Slice]] = {}
    for _ in range(rounds):
        for c in levels:
            for target in targets:
                result = asyncio.run(closed_loop(
                    target.url, target.request, target.headers, c,
                    warmup_s / rounds, duration_s / rounds,
                ))  # fmt: skip
                slices.setdefault((target.arm, c), []).append(result)
    out = []
    for target in targets:
        for c in levels:
            out.append(summarise(target.arm, config, c, slices[(target.arm, c)]))
            print(f"  {target.arm:8s} {config:10s} c={c:<3d} {out[-1].rps:7.2f} req/s  "
                  f"p50 {out[-1].p50_ms:8.1f} ms  p95 {out[-1].p95_ms:8.1f} ms  "
                  f"errors {out[-1].errors}", flush=True)  # fmt: skip
    return out


# --------------------------------------------------------------------------- arms
@contextmanager
def cores(which: set[int] | None) -> Iterator[None]:
    """Run this process, and what it starts meanwhile, on ``which`` cores (``None``: all)."""
    if which is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, which)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def split_cores(model_cores: int) -> tuple[set[int], set[int]]:
    """The first ``model_cores`` cores for TorchServe, the rest for the gateway and clients."""
    available = sorted(os.sched_getaffinity(0))
    if not 0 < model_cores < len(available):
        raise SystemExit(f"--split-cores {model_cores}: needs fewer than the {len(available)} cores")
    return set(available[:model_cores]), set(available[model_cores:])


def measure_ours(
    tmp: Path,
    config: ServeConfig,
    arms: list[str],
    levels: list[int],
    jpeg: bytes,
    timing: tuple[float, float, int],
    model_cores: int = 0,
) -> list[Measurement]:
    """Our handler direct and through the gateway; ``timing`` = (warm-up, duration, rounds).

    With ``model_cores``, TorchServe runs on that many cores and the gateway and the load
    generator on the others, as in a deployment where they live on different machines.
    """
    store = build_ours(tmp / f"ours-{config.label().replace(':', '_').replace('/', '_')}", config)
    server = TorchServeProcess(
        store, [f"{MODEL}.mar"], tmp / "ts-ours", free_port(), free_port(), free_port(),
        workers=config.workers, torch_threads=config.torch_threads,
    )  # fmt: skip
    bodies = {
        "direct": (frame_body(jpeg), MEDIA_TYPE),
        "direct-json": (json_body(jpeg), "application/json"),
    }
    model_side, client_side = split_cores(model_cores) if model_cores else (None, None)
    with ExitStack() as stack:
        with cores(model_side):
            stack.enter_context(torchserve(server))
        stack.enter_context(cores(client_side))
        targets = []
        for arm, (body, content_type) in bodies.items():
            if arm in arms:
                targets.append(Target(
                    arm, f"{server.inference_url}/predictions/{MODEL}",
                    lambda b=body, t=content_type: {"content": b, "headers": {"Content-Type": t}},
                    {"Authorization": f"Bearer {server.inference_token()}"},
                ))  # fmt: skip
        if "gateway" in arms:
            inflight = max(64, 2 * max(levels))
            base = stack.enter_context(gateway(torchserve_settings(server), tmp, inflight))
            targets.append(Target(
                "gateway", f"{base}/v1/models/{MODEL}/predict?top_k=5",
                lambda: {"files": {"image": ("x.jpg", jpeg, "image/jpeg")}},
                {"Authorization": f"Bearer {API_KEY}"},
            ))  # fmt: skip
        return run_levels(targets, config.label(), levels, *timing)


def measure_stock(
    tmp: Path, levels: list[int], jpeg: bytes, warmup_s: float, duration_s: float
) -> list[Measurement]:
    store = build_stock(tmp / "stock")
    server = StockTorchServe(
        store, [f"{STOCK}.mar"], tmp / "ts-stock", free_port(), free_port(), free_port()
    )
    with torchserve(server):
        target = Target(
            "stock", f"{server.inference_url}/predictions/{STOCK}",
            lambda: {"content": jpeg, "headers": {"Content-Type": "application/octet-stream"}},
            {"Authorization": f"Bearer {server.inference_token()}"},
        )  # fmt: skip
        return run_levels([target], "defaults", levels, warmup_s, duration_s)


# --------------------------------------------------------------------------- report
def table(results: list[Measurement]) -> str:
    rows = [
        "| arm | config | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        rows.append(
            f"| {m.arm} | {m.config} | {m.concurrency} | {m.rps:.1f} | {m.p50_ms:.0f} | "
            f"{m.p95_ms:.0f} | {m.p99_ms:.0f} | {m.errors} |"
        )
    return "\n".join(rows)


def cpu_table(results: list[Measurement]) -> str:
    """CPU milliseconds per completed request, per process role (``psutil``, window only).

    On a saturated machine the throughput of an arm is the cores divided by the sum of these,
    so they show what each part costs without the run-to-run drift of the rates.
    """
    roles = [*ROLES, "client"]
    rows = [
        "| arm | concurrency | " + " | ".join(roles) + " | all |",
        "|---|---|" + "---|" * (len(roles) + 1),
    ]
    for m in results:
        if m.cpu_ms:
            cells = " | ".join(f"{m.cpu_ms[r]:.2f}" for r in roles)
            rows.append(f"| {m.arm} | {m.concurrency} | {cells} | {sum(m.cpu_ms.values()):.2f} |")
    return "\n".join(rows)


def goals(results: list[Measurement]) -> list[tuple[str, bool, str]]:
    """The issue's goals, where the run has the arms and levels they need."""
    at = {(m.arm, m.concurrency): m for m in results}
    checks: list[tuple[str, bool, str]] = []
    for arm in ("direct", "gateway"):
        one, many = at.get((arm, 1)), at.get((arm, 32))
        if one and many:
            ratio = many.rps / one.rps if one.rps else 0.0
            checks.append((f"{arm}: no collapse (c32 >= 0.9 x c1)", ratio >= 0.9, f"{ratio:.2f}x"))
        stock = at.get(("stock", 32))
        if many and stock:
            ratio = many.rps / stock.rps if stock.rps else float("inf")
            checks.append((f"{arm}: c32 >= 5 x stock c32", ratio >= 5, f"{ratio:.1f}x"))
    gw, direct = at.get(("gateway", 8)), at.get(("direct", 8))
    if gw and direct:
        cost = direct.rps / gw.rps - 1 if gw.rps else float("inf")
        checks.append(("gateway: throughput cost < 10% at c8", cost < 0.10, f"{cost:+.1%}"))
        added = gw.p50_ms - direct.p50_ms
        checks.append(("gateway: adds < 5 ms p50 at c8", added < 5, f"{added:+.1f} ms"))
    return checks


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="gateway,direct,stock")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--warmup", type=float, default=5.0, help="s per level, not counted")
    parser.add_argument("--duration", type=float, default=20.0, help="s measured per level")
    parser.add_argument("--workers", type=int, default=ServeConfig.workers)
    parser.add_argument("--torch-threads", type=int, default=ServeConfig.torch_threads)
    parser.add_argument("--batch-size", type=int, default=ServeConfig.batch_size)
    parser.add_argument("--max-batch-delay", type=int, default=ServeConfig.max_batch_delay_ms)
    parser.add_argument("--rounds", type=int, default=4,
                        help="gateway and direct take turns in this many slices per level")
    parser.add_argument("--sweep", help="our configs to compare, WxT:B/D comma-separated")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--split-cores", type=int, default=0, metavar="N",
                        help="TorchServe on the first N cores, gateway and clients on the rest")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.sweep:
        configs = [ServeConfig.parse(text.strip()) for text in args.sweep.split(",")]
    else:
        configs = [
            ServeConfig(args.workers, args.torch_threads, args.batch_size, args.max_batch_delay)
        ]
    jpeg = sample_jpeg()
    before = load_average()
    print(f"cores {os.cpu_count()}, load average before: {before}", flush=True)
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="beyond-bench-") as tmp:
        for config in configs:
            if {"gateway", "direct", "direct-json"} & set(arms):
                timing = (args.warmup, args.duration, args.rounds)
                results += measure_ours(
                    Path(tmp), config, arms, levels, jpeg, timing, args.split_cores
                )
        if "stock" in arms:
            results += measure_stock(Path(tmp), levels, jpeg, args.warmup, args.duration)
    after = load_average()
    print(f"\nload average before: {before}; after: {after}\n")
    print(table(results))
    print("\nCPU ms per request\n")
    print(cpu_table(results))
    checks = goals(results)
    for name, ok, value in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "load_average_before": before,
                    "load_average_after": after,
                    "results": [asdict(m) for m in results],
                    "goals": [{"goal": n, "ok": ok, "value": v} for n, ok, v in checks],
                },
                indent=2,
            )
        )
    return 1 if args.check and not all(ok for _, ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

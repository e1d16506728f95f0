"""The gateway's own CPU per prediction, in front of a model server that answers at once.

In ``benchmarks/serving.py`` the gateway sits in front of a real TorchServe whose ~40 ms of
model work per prediction, and the machine's drift, swamp the gateway's few milliseconds.
Here the model server is the unit tests' fake TorchServe (``tests/unit/fake_torchserve.py``:
canned replies, no model), so the gateway process's CPU per request is what differs between
two versions of the gateway. Same request as the serving benchmark: a 256x256 JPEG posted
as multipart to ``/predict``, closed loop.

    python -m benchmarks.gateway_cpu                       # 1 and 8 clients, 20 s each
    python -m benchmarks.gateway_cpu --concurrency 8 --rounds 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.serving import API_KEY, Target, gateway, run_levels, sample_jpeg
from model_store.stack import ManagedProcess, free_port, wait_ready
from tests.unit import fake_torchserve

MODEL = "shapes-resnet"  # a name the fake serves


@contextmanager
def fake_model_server(state: Path) -> Iterator[str]:
    """The unit tests' fake TorchServe on a free port; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "tests.unit.fake_torchserve:app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    process = ManagedProcess("fake-torchserve", command, state / "fake.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 30, check=process, path="/ping")
        yield url
    finally:
        process.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--warmup", type=float, default=3.0, help="s per level, not counted")
    parser.add_argument("--duration", type=float, default=20.0, help="s measured per level")
    parser.add_argument("--rounds", type=int, default=2, help="slices per level")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    jpeg = sample_jpeg()
    with tempfile.TemporaryDirectory(prefix="beyond-gateway-cpu-") as tmp:
        with fake_model_server(Path(tmp)) as url:
            settings = {"BEYOND_TORCHSERVE_URL": url, "BEYOND_TORCHSERVE_TOKEN": fake_torchserve.TOKEN}
            with gateway(settings, Path(tmp), max_inflight=64, model=MODEL) as base:
                target = Target(
                    "gateway", f"{base}/v1/models/{MODEL}/predict?top_k=5",
                    lambda: {"files": {"image": ("x.jpg", jpeg, "image/jpeg")}},
                    {"Authorization": f"Bearer {API_KEY}"},
                )  # fmt: skip
                results = run_levels([target], "fake", levels, args.warmup, args.duration, args.rounds)
    print("\n| clients | req/s | p50 ms | gateway CPU ms per request | load generator CPU ms |")
    print("|---|---|---|---|---|")
    for m in results:
        print(f"| {m.concurrency} | {m.rps:.0f} | {m.p50_ms:.1f} | {m.cpu_ms['gateway']:.2f} | "
              f"{m.cpu_ms['client']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

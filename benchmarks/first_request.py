"""The first request after a model server starts against the tenth: what a worker builds late.

``python -m benchmarks.first_request [--model shapes-resnet] [--runs 3]`` loads a demo model
as TorchServe's ``initialize`` does, then sends one task ten times and times request 1 and
request 10, for ``predict``, a gradient ``explain`` and an LRP ``explain``. Each task runs
in a fresh process, so its first request pays for everything a worker builds on demand
(the derived copies of the network, lazy kernels) and shares nothing with the other tasks.
Prints a markdown table of the median and the best of ``--runs`` processes (the best is
the steadier figure on a machine that other work shares), with the time the load took.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from PIL import Image

from handlers.tasks import TaskRunner
from handlers.torchserve_handler import configure_threads, select_device
from model_store import paths
from model_store.shapes import ShapesConfig, render, sample_attributes
from protocol import contract

CASES = ("predict", "explain gradient", "explain lrp")


def demo_image() -> str:
    image, _ = render(sample_attributes(ShapesConfig(), "test", 0), 64)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request_for(case: str, image: str) -> contract.BaseModel:
    if case == "predict":
        return contract.PredictRequest(image=image)
    return contract.ExplainRequest(image=image, method=case.removeprefix("explain "))


def serve(model: str, device: torch.device) -> TaskRunner:
    """What ``BeyondHandler.initialize`` builds from a model directory."""
    return TaskRunner.load(paths.DEMO_WEIGHTS_DIR / model, device)


def one_process(model: str, case: str) -> dict[str, float]:
    """Load, then request ``case`` ten times; milliseconds of the load, request 1 and 10."""
    configure_threads(1)
    device = select_device(0 if torch.cuda.is_available() else None)
    start = time.perf_counter()
    runner = serve(model, device)
    load_ms = (time.perf_counter() - start) * 1000
    request = request_for(case, demo_image())
    times = []
    for _ in range(10):
        start = time.perf_counter()
        runner.run(request)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return {"load_ms": load_ms, "first_ms": times[0], "tenth_ms": times[9]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-resnet")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per task")
    parser.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)  # a child's task
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_process(args.model, args.one)))
        return
    print(f"model {args.model}; median / best of {args.runs} fresh processes per task")
    print("| task | load ms | request 1 ms | request 10 ms |")
    print("|---|---|---|---|")
    for case in CASES:
        runs: list[dict[str, Any]] = []
        for _ in range(args.runs):
            child = [sys.executable, "-m", "benchmarks.first_request", "--model", args.model, "--one", case]
            runs.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
        cells = [[r[key] for r in runs] for key in ("load_ms", "first_ms", "tenth_ms")]
        print(f"| {case} | " + " | ".join(f"{statistics.median(c):.1f} / {min(c):.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()

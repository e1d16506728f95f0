"""Every handler task on the CPU and on the GPU: same answers, and how long each takes.

``python -m benchmarks.devices [--model shapes-resnet] [--repeats 3]`` runs each task of
:class:`handlers.tasks.TaskRunner` through the contract on both devices (the GPU only when
one is present), prints a markdown table of per-request times and the largest difference
between the CPU and GPU relevance maps, and exits non-zero when the devices disagree on a
prediction or a map differs by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from handlers.explainers import available_explainers
from handlers.tasks import TaskRunner
from handlers.torchserve_handler import select_device
from model_store import paths
from model_store.shapes import ShapesConfig, render, sample_attributes
from protocol import contract
from protocol.arrays import decode_array


def demo_image(index: int) -> str:
    image, _ = render(sample_attributes(ShapesConfig(), "test", index), 64)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def requests(image: str) -> dict[str, contract.BaseModel]:
    cases: dict[str, contract.BaseModel] = {
        f"explain {m}": contract.ExplainRequest(image=image, method=m, outputs=["relevance"])
        for m in available_explainers()
    }
    cases["attack ifgsm"] = contract.AttackRequest(image=image, method="ifgsm", params={"steps": 10})
    cases["attack pgd"] = contract.AttackRequest(image=image, method="pgd", params={"steps": 10})
    cases["apem gradient"] = contract.ApemRequest(image=image, method="gradient")
    cases["robustness x32"] = contract.RobustnessRequest(images=[image] * 32)
    return cases


def timed(runner: TaskRunner, request: contract.BaseModel, repeats: int) -> tuple[float, contract.BaseModel]:
    runner.run(request)  # warm-up (cuDNN autotuning, lazy init)
    times, result = [], None
    for _ in range(repeats):
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = runner.run(request)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="shapes-resnet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([select_device(0)] if torch.cuda.is_available() else [])
    runners = []
    for device in devices:
        runners.append(TaskRunner.load(paths.DEMO_WEIGHTS_DIR / args.model, device))
    print(f"model {args.model}; devices: {', '.join(str(d) for d in devices)}"
          + (f" ({torch.cuda.get_device_name()})" if len(devices) > 1 else ""))
    print("| task | " + " | ".join(f"{d} ms" for d in devices) + " | max abs diff | same answer |")
    print("|---|" + "---|" * (len(devices) + 2))
    failures = 0
    for name, request in requests(demo_image(0)).items():
        outcomes = [timed(r, request, args.repeats) for r in runners]
        diff, same = float("nan"), True
        if len(outcomes) == 2:
            a, b = (o[1] for o in outcomes)
            if isinstance(a, contract.ExplainResult) and a.relevance and b.relevance:  # type: ignore[union-attr]
                diff = float(np.abs(decode_array(a.relevance) - decode_array(b.relevance)).max())  # type: ignore[union-attr, arg-type]
                same = a.target == b.target and diff <= args.tolerance  # type: ignore[union-attr]
            elif isinstance(a, contract.AttackResult):
                same = a.adversarial.class_index == b.adversarial.class_index  # type: ignore[union-attr]
            elif isinstance(a, contract.ApemResult):
                same = (a.eps_minus, a.eps_plus) == (b.eps_minus, b.eps_plus)  # type: ignore[union-attr]
            elif isinstance(a, contract.RobustnessResult):
                same = a.steps_to_flip == b.steps_to_flip  # type: ignore[union-attr]
        failures += not same
        cells = " | ".join(f"{o[0]:.1f}" for o in outcomes)
        print(f"| {name} | {cells} | {diff:.2e} | {'yes' if same else 'NO'} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Criticism, apem and audit jobs end to end, and what they do to interactive latency meanwhile.

Against a running stack (``make up``): uploads the first ``--images`` demo test images as one
class, runs each ``--methods`` criticism job ``--rounds`` times and, while each runs, sends a
``/predict`` every 100 ms from another client. Prints a markdown table: the job's seconds
and the predictions' median and p95 latency, beside the idle latency. The job settings are
the stack's: compare ``BEYOND_EMBED_CONCURRENCY=1`` and ``=2`` by restarting it between runs.
With ``--apem N``, also scores the first N demo test images (in their classes) with gradient
maps by one ``apem`` job and by N ``/apem`` requests one after another, and checks that both
give every image the same sizes. With ``--audit N`` (``--evaluate N``), runs the spurious-feature audit
with the defaults and without overlays at one noise level (the evaluate job) over the first
N demo test images in their classes, and prints seconds and result sizes; likewise
``--overinterpretation N`` (sufficient input subsets, default parameters, 8 subsets shown).

    python -m benchmarks.jobs --images 2000 --apem 200 --audit 1200 --evaluate 3000 --overinterpretation 300
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
import zipfile
from pathlib import Path

import httpx

from benchmarks.markdown import table
from model_store import paths
from service.client import BeyondClient
from service.settings import get_settings

MODEL = "shapes-resnet"


def demo_files(n: int) -> list[Path]:
    """The first ``n`` demo test images (``<class>/<index>.png``)."""
    return sorted((paths.DATA_DIR / "spurious-shapes" / "test").glob("*/*.png"))[:n]


def zipped(files: list[Path], one_class: bool) -> bytes:
    """A dataset archive of ``files``: all in one class ``all``, or in their own classes."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for f in files:
            archive.writestr(f"all/{f.parent.name}_{f.name}" if one_class else f"{f.parent.name}/{f.name}",
                             f.read_bytes())  # fmt: skip
    return out.getvalue()


def sample_latency(client: httpx.Client, png: bytes, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        client.post(f"/v1/models/{MODEL}/predict", files={"image": ("a.png", png, "image/png")})
        out.append(time.perf_counter() - start)
        time.sleep(0.1)


def while_sampling(client: httpx.Client, png: bytes, work) -> tuple[float, list[float]]:  # noqa: ANN001
    """Seconds ``work()`` took and the prediction latencies sampled meanwhile."""
    latencies: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_latency, args=(client, png, stop, latencies))
    start = time.perf_counter()
    sampler.start()
    try:
        work()
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    return seconds, latencies


def run_job(beyond: BeyondClient, job: dict) -> dict:
    """Submit ``job``, wait for it (polling every 50 ms), return its result."""
    return beyond.wait_result(beyond.submit_job(job), poll=0.05)


def criticism(beyond: BeyondClient, dataset: str, method: str) -> None:
    run_job(beyond, {"type": "criticism", "model": MODEL, "dataset_id": dataset, "class_name": "all",
                     "method": method, "m": 6, "params": {}})  # fmt: skip


def apem_rows(beyond: BeyondClient, n: int) -> list[list]:
    """One apem job over ``n`` images against ``n`` /apem requests; the same sizes or exit."""
    files = demo_files(n)
    dataset = beyond.upload_dataset(zipped(files, one_class=False))["dataset_id"]
    try:
        start = time.perf_counter()
        result = run_job(beyond, {"type": "apem", "model": MODEL, "dataset_id": dataset, "method": "gradient",
                                  "max_images": n})  # fmt: skip
        job_seconds = time.perf_counter() - start
    finally:
        beyond.delete_dataset(dataset)
    start = time.perf_counter()
    alone = {}
    for f in files:
        body = beyond.apem(MODEL, f, "gradient")
        alone[f"{f.parent.name}/{f.name}"] = (body["eps_minus"], body["eps_plus"])
    request_seconds = time.perf_counter() - start
    if any(alone[i["file"]] != (i["eps_minus"], i["eps_plus"]) for i in result["items"]):
        raise SystemExit("the apem job and /apem disagree")
    rho = result["spearman"]["rho"] if result["spearman"] else None
    return [
        [f"apem job, {n} images", job_seconds, n / job_seconds, result["apem"], rho],
        [f"{n} x /apem, one at a time", request_seconds, n / request_seconds, None, None],
    ]


def timed_jobs(beyond: BeyondClient, n: int, jobs: list[tuple[str, dict]]) -> list[list]:
    """Each ``(name, job)`` over the first ``n`` demo test images in their classes: seconds,
    images per second and result size."""
    dataset = beyond.upload_dataset(zipped(demo_files(n), one_class=False))["dataset_id"]
    rows = []
    try:
        for name, job in jobs:
            start = time.perf_counter()
            result = run_job(beyond, {"model": MODEL, "dataset_id": dataset, "max_images": n, **job})
            seconds = time.perf_counter() - start
            rows.append([name, seconds, n / seconds, len(json.dumps(result)) / 1000])
    finally:
        beyond.delete_dataset(dataset)
    return rows


AUDITS = [
    ("audit, defaults (5 features, 3 levels, 5 overlays each)", {"type": "audit"}),
    ("audit, 5 features, 1 level, no overlays", {"type": "audit", "sigmas": [0.25], "gallery_images": 0}),
]
EVALUATION = [("evaluate, top-5", {"type": "evaluate"})]
OVERINTERPRETATION = [("overinterpretation, defaults", {"type": "overinterpretation"})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="default: the key `make up` stored")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--methods", nargs="*", default=["adversarial", "mmd"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--apem", type=int, default=0, help="images of the apem comparison (0: skip)")
    parser.add_argument("--audit", type=int, default=0, help="images of the audit jobs (0: skip)")
    parser.add_argument("--evaluate", type=int, default=0, help="images of the evaluate job (0: skip)")
    parser.add_argument("--overinterpretation", type=int, default=0, help="images of that job (0: skip)")
    args = parser.parse_args()
    key = args.api_key or get_settings().resolved_api_keys()[0]
    headers = {"Authorization": f"Bearer {key}"}
    files = demo_files(args.images)
    png = files[0].read_bytes()
    with BeyondClient(args.url, key, timeout=120) as beyond, \
            httpx.Client(base_url=args.url, headers=headers, timeout=120) as interactive:  # fmt: skip
        dataset = beyond.upload_dataset(zipped(files, one_class=True))["dataset_id"]
        try:
            _, idle = while_sampling(interactive, png, lambda: time.sleep(3))
            rows = []
            for _ in range(args.rounds):
                for method in args.methods:
                    seconds, busy = while_sampling(interactive, png, lambda m=method: criticism(beyond, dataset, m))
                    p95 = statistics.quantiles(busy, n=20)[-1] if len(busy) > 1 else busy[0]
                    rows.append([method, seconds, 1000 * statistics.median(busy), 1000 * p95, len(busy)])
        finally:
            beyond.delete_dataset(dataset)
        scored = apem_rows(beyond, args.apem) if args.apem else []
        audited = timed_jobs(beyond, args.audit, AUDITS) if args.audit else []
        audited += timed_jobs(beyond, args.evaluate, EVALUATION) if args.evaluate else []
        if args.overinterpretation:
            audited += timed_jobs(beyond, args.overinterpretation, OVERINTERPRETATION)
    title = (f"criticism jobs on {args.images} images of {MODEL} ({args.url}); "
             f"idle /predict median {1000 * statistics.median(idle):.0f} ms")
    table(title, ["method", "job seconds", "/predict median ms", "/predict p95 ms", "predictions"], rows)
    if scored:
        title = f"APEM of gradient maps (grid step 1 x 2000), {MODEL}: same sizes for every image"
        table(title, ["how", "seconds", "images/s", "mean APEM", "Spearman rho (APEM, loss)"], scored)
    if audited:
        title = (f"audit ({args.audit} images), evaluate ({args.evaluate} images) and overinterpretation "
                 f"({args.overinterpretation} images) jobs, {MODEL}")
        table(title, ["job", "seconds", "images/s", "result KB"], audited)


if __name__ == "__main__":
    main()

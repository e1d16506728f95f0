"""Criticism and apem jobs end to end, and what they do to interactive latency meanwhile.

Against a running stack (``make up``): uploads the first ``--images`` demo test images as one
class, runs each ``--methods`` criticism job ``--rounds`` times and, while each runs, sends a
``/predict`` every 100 ms from another client. Prints a markdown table: the job's seconds
and the predictions' median and p95 latency, beside the idle latency. The job settings are
the stack's: compare ``BEYOND_EMBED_CONCURRENCY=1`` and ``=2`` by restarting it between runs.
With ``--apem N``, also scores the first N demo test images (in their classes) with gradient
maps by one ``apem`` job and by N ``/apem`` requests one after another, and checks that both
give every image the same sizes.

    python -m benchmarks.jobs --images 2000 --apem 200
"""

from __future__ import annotations

import argparse
import io
import statistics
import threading
import time
import zipfile

import httpx

from benchmarks.markdown import table
from model_store import paths
from service.settings import get_settings

MODEL = "shapes-resnet"


def demo_zip(n: int) -> tuple[bytes, bytes]:
    """The first ``n`` demo test images as one class ``all``; and one of them as a PNG."""
    files = sorted((paths.DATA_DIR / "spurious-shapes" / "test").glob("*/*.png"))[:n]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for f in files:
            archive.writestr(f"all/{f.parent.name}_{f.name}", f.read_bytes())
    return out.getvalue(), files[0].read_bytes()


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


def run_job(api: httpx.Client, job: dict) -> dict:
    """Submit ``job``, wait for it, return its result."""
    job_id = api.post("/v1/jobs", json=job).json()["job_id"]
    while (status := api.get(f"/v1/jobs/{job_id}").json()["status"]) not in ("finished", "failed", "canceled"):
        time.sleep(0.05)
    if status != "finished":
        raise SystemExit(f"{job['type']} job {job_id} {status}")
    return api.get(f"/v1/jobs/{job_id}/result").json()


def criticism(api: httpx.Client, dataset: str, method: str) -> None:
    run_job(api, {"type": "criticism", "model": MODEL, "dataset_id": dataset, "class_name": "all",
                  "method": method, "m": 6, "params": {}})  # fmt: skip


def apem_rows(api: httpx.Client, n: int) -> list[list]:
    """One apem job over ``n`` images against ``n`` /apem requests; the same sizes or exit."""
    files = sorted((paths.DATA_DIR / "spurious-shapes" / "test").glob("*/*.png"))[:n]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for f in files:
            archive.writestr(f"{f.parent.name}/{f.name}", f.read_bytes())
    reply = api.post("/v1/datasets", files={"archive": ("d.zip", out.getvalue(), "application/zip")})
    reply.raise_for_status()
    dataset = reply.json()["dataset_id"]
    try:
        start = time.perf_counter()
        result = run_job(api, {"type": "apem", "model": MODEL, "dataset_id": dataset, "method": "gradient",
                               "max_images": n})  # fmt: skip
        job_seconds = time.perf_counter() - start
    finally:
        api.delete(f"/v1/datasets/{dataset}")
    start = time.perf_counter()
    alone = {}
    for f in files:
        body = api.post(f"/v1/models/{MODEL}/apem", data={"method": "gradient"},
                        files={"image": ("x.png", f.read_bytes(), "image/png")}).json()  # fmt: skip
        alone[f"{f.parent.name}/{f.name}"] = (body["eps_minus"], body["eps_plus"])
    request_seconds = time.perf_counter() - start
    if any(alone[i["file"]] != (i["eps_minus"], i["eps_plus"]) for i in result["items"]):
        raise SystemExit("the apem job and /apem disagree")
    rho = result["spearman"]["rho"] if result["spearman"] else None
    return [
        [f"apem job, {n} images", job_seconds, n / job_seconds, result["apem"], rho],
        [f"{n} x /apem, one at a time", request_seconds, n / request_seconds, None, None],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="default: the key `make up` stored")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--methods", nargs="*", default=["adversarial", "mmd"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--apem", type=int, default=0, help="images of the apem comparison (0: skip)")
    args = parser.parse_args()
    key = args.api_key or get_settings().resolved_api_keys()[0]
    headers = {"Authorization": f"Bearer {key}"}
    archive, png = demo_zip(args.images)
    with httpx.Client(base_url=args.url, headers=headers, timeout=120) as api, \
            httpx.Client(base_url=args.url, headers=headers, timeout=120) as interactive:  # fmt: skip
        reply = api.post("/v1/datasets", files={"archive": ("d.zip", archive, "application/zip")})
        reply.raise_for_status()
        dataset = reply.json()["dataset_id"]
        try:
            _, idle = while_sampling(interactive, png, lambda: time.sleep(3))
            rows = []
            for _ in range(args.rounds):
                for method in args.methods:
                    seconds, busy = while_sampling(interactive, png, lambda m=method: criticism(api, dataset, m))
                    p95 = statistics.quantiles(busy, n=20)[-1] if len(busy) > 1 else busy[0]
                    rows.append([method, seconds, 1000 * statistics.median(busy), 1000 * p95, len(busy)])
        finally:
            api.delete(f"/v1/datasets/{dataset}")
        scored = apem_rows(api, args.apem) if args.apem else []
    title = (f"criticism jobs on {args.images} images of {MODEL} ({args.url}); "
             f"idle /predict median {1000 * statistics.median(idle):.0f} ms")
    table(title, ["method", "job seconds", "/predict median ms", "/predict p95 ms", "predictions"], rows)
    if scored:
        title = f"APEM of gradient maps (grid step 1 x 2000), {MODEL}: same sizes for every image"
        table(title, ["how", "seconds", "images/s", "mean APEM", "Spearman rho (APEM, loss)"], scored)


if __name__ == "__main__":
    main()

"""Locust model of Beyond's clients (run it through ``python -m load_tests.run``).

``MixedUser`` is the everyday client population: mostly predictions, explanations with each
served method in turn, adversarial attacks, and criticism jobs submitted and followed to
their result. Every request is a real demo-dataset image with a valid API key. The task
weights come from ``load_tests/config.toml`` (``[mix]``); tasks the model does not serve
are skipped, so the mix adapts to what ``GET /v1/models/{model}`` lists at start.

``PredictUser`` sends predictions only, at a fixed rate per user; with ``BEYOND_LOAD_STEPS``
set, ``StepLoad`` walks it through those request rates to find the capacity and then drops
to a low rate to check the recovery.

Every request is also appended to the CSV file named by ``BEYOND_LOAD_SAMPLES`` (end time,
name, latency, status), from which the runner computes percentiles and the plot.

Environment (set by the runner): ``BEYOND_LOAD_CONFIG`` (TOML), ``BEYOND_LOAD_API_KEY``,
``BEYOND_LOAD_SAMPLES``, ``BEYOND_LOAD_STEPS`` (``rate:seconds,...``), ``BEYOND_LOAD_DATA``
(an ImageFolder split, default the demo test split).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import random
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.exception import RescheduleTaskImmediately

from load_tests.pacing import Pacer

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads(
    Path(os.environ.get("BEYOND_LOAD_CONFIG", REPO / "load_tests" / "config.toml")).read_text()
)
MODEL = CONFIG["run"]["model"]
MIX: dict[str, int] = CONFIG["mix"]
BOUNDARY = "beyond-load-boundary"


class Served:
    """What the target serves and the client data, filled once at test start."""

    explainers: list[str] = []
    attacks: list[str] = []
    images: list[bytes] = []
    dataset_id: str | None = None
    class_name: str | None = None
    api_key: str = ""


# --------------------------------------------------------------------------- samples
class Samples:
    """Every request's outcome, appended to a CSV file for the runner's report."""

    writer: Any = None
    handle: Any = None

    @classmethod
    def open(cls) -> None:
        path = os.environ.get("BEYOND_LOAD_SAMPLES")
        if path and cls.writer is None:
            cls.handle = open(path, "w", newline="", buffering=1 << 16)  # noqa: SIM115
            cls.writer = csv.writer(cls.handle)
            cls.writer.writerow(["end_s", "name", "latency_ms", "status", "retry_after"])

    @classmethod
    def close(cls) -> None:
        if cls.handle is not None:
            cls.handle.close()
            cls.handle, cls.writer = None, None


@events.request.add_listener
def _record(name: str, response_time: float, response: Any = None, **_: Any) -> None:
    if Samples.writer is None:
        return
    status = getattr(response, "status_code", 0) or 0
    headers = getattr(response, "headers", None) or {}
    retry = headers.get("retry-after", "") if status in (429, 503) else ""
    Samples.writer.writerow([f"{time.time():.3f}", name, f"{response_time:.2f}", status, retry])


# --------------------------------------------------------------------------- data
def load_images(root: Path, count: int, seed: int = 0) -> list[bytes]:
    """``count`` PNG files of the demo dataset's split (all classes), fixed order."""
    files = sorted(root.glob("*/*.png"))
    if not files:
        raise RuntimeError(f"no images under {root}: generate the demo data (make up)")
    random.Random(seed).shuffle(files)
    return [f.read_bytes() for f in files[:count]]


def dataset_zip(root: Path, classes: int, per_class: int) -> bytes:
    """A small ImageFolder zip from the demo data for criticism jobs."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for folder in sorted(p for p in root.iterdir() if p.is_dir())[:classes]:
            for image in sorted(folder.glob("*.png"))[:per_class]:
                archive.writestr(f"{folder.name}/{image.name}", image.read_bytes())
    return out.getvalue()


def multipart(fields: dict[str, str], image: bytes, field: str = "image") -> bytes:
    """A multipart/form-data body (FastHttpUser has no ``files=``)."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _headers(content_type: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {Served.api_key}"}
    if content_type:
        headers["Content-Type"] = content_type
    return headers


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    import httpx

    Samples.open()
    Served.api_key = os.environ.get("BEYOND_LOAD_API_KEY", "")
    data = Path(os.environ.get("BEYOND_LOAD_DATA", REPO / CONFIG["data"]["images"]))
    Served.images = load_images(data, int(CONFIG["data"]["count"]))
    with httpx.Client(base_url=environment.host, headers=_headers(), timeout=60) as client:
        reply = client.get(f"/v1/models/{MODEL}")
        reply.raise_for_status()
        detail = reply.json()
        Served.explainers = [m for m in detail.get("explainers", []) if m in CONFIG["explain"]]
        Served.attacks = [m for m in detail.get("attacks", []) if m in CONFIG["attack"]]
        if MIX.get("job", 0) > 0 and not os.environ.get("BEYOND_LOAD_STEPS"):
            body = dataset_zip(data, int(CONFIG["job"]["classes"]), int(CONFIG["job"]["per_class"]))
            reply = client.post(
                "/v1/datasets", files={"archive": ("d.zip", body, "application/zip")}
            )
            reply.raise_for_status()
            uploaded = reply.json()
            Served.dataset_id = uploaded["dataset_id"]
            Served.class_name = sorted(uploaded["classes"])[0]
    print(
        f"target {environment.host} model {MODEL}: explainers {Served.explainers or 'none'}, "
        f"attacks {Served.attacks or 'none'}, dataset {Served.dataset_id}"
    )


@events.test_stop.add_listener
def _stop(environment: Any, **_: Any) -> None:
    Samples.close()


# --------------------------------------------------------------------------- users
class MixedUser(FastHttpUser):
    """A client of the service: think time between requests, weighted tasks per route."""

    wait_time = between(*CONFIG["run"]["think_time_s"])
    network_timeout = float(CONFIG["run"]["timeout_s"])
    connection_timeout = 10.0

    def on_start(self) -> None:
        offset = random.randrange(1 << 16)
        self.explain_methods = itertools.islice(itertools.cycle(Served.explainers), offset, None)
        self.attack_methods = itertools.islice(itertools.cycle(Served.attacks), offset, None)

    def image(self) -> bytes:
        return random.choice(Served.images)

    def post_image(self, route: str, name: str, fields: dict[str, str]) -> Any:
        body = multipart(fields, self.image())
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
        return self.client.post(
            f"/v1/models/{MODEL}/{route}", data=body, headers=_headers(content_type), name=name
        )

    @task(MIX.get("predict", 0))
    def predict(self) -> None:
        self.post_image("predict", "POST /predict", {})

    @task(MIX.get("explain", 0))
    def explain(self) -> None:
        if not Served.explainers:
            raise RescheduleTaskImmediately
        method = next(self.explain_methods)
        params = json.dumps(CONFIG["explain"].get(method) or {})
        self.post_image("explain", f"POST /explain {method}", {"method": method, "params": params})

    @task(MIX.get("attack", 0))
    def attack(self) -> None:
        if not Served.attacks:
            raise RescheduleTaskImmediately
        method = next(self.attack_methods)
        params = json.dumps(CONFIG["attack"].get(method) or {})
        self.post_image("attack", f"POST /attack {method}", {"method": method, "params": params})

    @task(MIX.get("job", 0))
    def job(self) -> None:
        if Served.dataset_id is None:
            raise RescheduleTaskImmediately
        spec = {
            "type": "criticism",
            "model": MODEL,
            "dataset_id": Served.dataset_id,
            "class_name": Served.class_name,
            "method": CONFIG["job"]["method"],
            "m": int(CONFIG["job"]["m"]),
        }
        reply = self.client.post("/v1/jobs", json=spec, headers=_headers(), name="POST /jobs")
        if reply.status_code != 202:
            return
        job_id = reply.json()["job_id"]
        deadline = time.monotonic() + float(CONFIG["job"]["poll_timeout_s"])
        while time.monotonic() < deadline:
            time.sleep(float(CONFIG["job"]["poll_interval_s"]))
            status = self.client.get(
                f"/v1/jobs/{job_id}", headers=_headers(), name="GET /jobs/{id}"
            )
            state = status.json().get("status") if status.status_code == 200 else None
            if state in ("finished", "failed", "canceled"):
                break
        self.client.get(
            f"/v1/jobs/{job_id}/result", headers=_headers(), name="GET /jobs/{id}/result"
        )


class PredictUser(FastHttpUser):
    """Predictions only, ``per_user_rps`` each: the users x rate set the offered load.

    Each user keeps its own random phase within the period (:class:`~load_tests.pacing.Pacer`),
    so a step's users, started together, offer a steady rate rather than one burst per period.
    """

    network_timeout = float(CONFIG["run"]["timeout_s"])
    connection_timeout = 10.0

    def on_start(self) -> None:
        now = time.perf_counter()
        self.pacer = Pacer(1 / float(CONFIG["capacity"]["per_user_rps"]), now)
        time.sleep(self.pacer.first_wait(now))

    def wait_time(self) -> float:
        return self.pacer.next_wait(time.perf_counter())

    @task
    def predict(self) -> None:
        body = multipart({}, random.choice(Served.images))
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
        self.client.post(
            f"/v1/models/{MODEL}/predict",
            data=body,
            headers=_headers(content_type),
            name="POST /predict",
        )


def parse_steps(text: str) -> list[tuple[float, float]]:
    """``rate:seconds,rate:seconds,...`` -> [(requests/s, seconds), ...]."""
    steps = []
    for part in text.split(","):
        rate, _, seconds = part.strip().partition(":")
        steps.append((float(rate), float(seconds)))
    return steps


if os.environ.get("BEYOND_LOAD_STEPS"):

    class StepLoad(LoadTestShape):
        """Offered load in steps (users = rate / per-user rate); ``None`` after the last."""

        steps = parse_steps(os.environ["BEYOND_LOAD_STEPS"])
        per_user = float(CONFIG["capacity"]["per_user_rps"])
        current = -1

        def tick(self) -> tuple[int, float] | None:
            elapsed = self.get_run_time()
            for index, (rate, seconds) in enumerate(self.steps):
                if elapsed < seconds:
                    if index != self.current:  # mark the step's start for the report
                        self.current = index
                        Samples.open()
                        if Samples.writer is not None:
                            Samples.writer.writerow(
                                [f"{time.time():.3f}", "__step__", rate, -1, ""]
                            )
                    users = max(1, math.ceil(rate / self.per_user))
                    return users, 1000.0  # a step's users start (or stop) at once
                elapsed -= seconds
            return None

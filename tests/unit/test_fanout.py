"""Dataset jobs fanned out into chunks and a reduce (real Redis, the real worker class and a
worker process, fake TorchServe): the same results as the whole job, progress summed over
the chunks, cancelling, failing and retrying chunks."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from model_store.stack import service_env, worker_process
from service.datasets import DatasetStore
from service.gateway.app import create_app
from service.jobs.fanout import MAX_CHUNKS, calls, decode_part, encode_part, plan
from service.jobs.tasks import CHUNKS_KEPT_S
from service.jobs.worker import build_worker
from service.settings import Settings
from tests.unit import fake_torchserve
from tests.unit.conftest import API_KEY
from tests.unit.test_datasets_jobs import _timeless, colored, grey, make_zip, run_worker, upload


def test_chunks_are_about_equal_and_cut_between_units() -> None:
    assert plan(calls(100, 8), 30) == [(0, 24), (24, 48), (48, 72), (72, 100)]
    assert plan(calls(100, 8), 0) == [(0, 100)] == plan(calls(100, 8), 100)
    assert plan([5, 20, 5], 10) == [(0, 5), (5, 25), (25, 30)]  # a unit larger than a chunk stays whole
    assert plan([3, 3], 1) == [(0, 3), (3, 6)]  # no more chunks than units
    many = plan([1] * 10_000, 1)
    sizes = [stop - start for start, stop in many]
    assert len(many) == MAX_CHUNKS and max(sizes) - min(sizes) <= 1 and many[-1][1] == 10_000


def test_parts_travel_as_json_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    part = {
        "embeddings": rng.standard_normal((5, 3)).astype(np.float32),
        "robustness": rng.standard_normal(5),  # float64: protocol.arrays would round it to float32
        "steps_to_flip": np.arange(-1, 4),
        "rows": [{"x": 0.1 + 0.2, "none": None}],
        "count": None,
    }
    back = decode_part(json.loads(json.dumps(encode_part(part))))
    for key in ("embeddings", "robustness", "steps_to_flip"):
        assert back[key].dtype == part[key].dtype and back[key].tobytes() == part[key].tobytes()
    assert back["rows"] == part["rows"] and back["count"] is None


@contextmanager
def gateway(settings: Settings, chunk_images: int) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"chunk_images": chunk_images}))
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def shapes_dataset(client: TestClient) -> str:
    """26 images of three classes, votes, and region masks on some circles only (so that the
    overinterpretation's calls are grouped by masks)."""
    entries = {f"circle/{i}.png": colored(i) for i in range(1, 13)}
    entries |= {f"square/{i}.png": colored(i) for i in range(13, 21)}
    entries |= {f"triangle/{i}.png": colored(i) for i in range(21, 27)}
    entries |= {f"_masks/core/circle/{i}.png": grey(255) for i in range(1, 7)}
    entries |= {f"_masks/spurious/circle/{i}.png": grey(51) for i in range(4, 9)}
    votes = "file,class_name,yes,raters\ntriangle/21.png,circle,5,5\nsquare/14.png,circle,2,5\n"
    reply = upload(client, make_zip({**entries, "metadata.csv": votes.encode()}))
    assert reply.status_code == 201, reply.text
    return str(reply.json()["dataset_id"])


def fetch(redis: Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer)


def chunk_jobs(redis: Redis, job_id: str) -> list[Job]:
    return [fetch(redis, entry["id"]) for entry in fetch(redis, job_id).meta.get("chunks", [])]


def model_calls() -> list[str]:
    """The TorchServe calls made so far (the describe calls aside), in a canonical order."""
    return sorted(json.dumps(r, sort_keys=True) for r in fake_torchserve.State.requests if r["task"] != "describe")


CRITICISM = {"type": "criticism", "class_name": "circle", "m": 2, "params": {"prototypes": 2}}
JOBS = {  # job, threshold, chunks it makes (0: not split)
    "apem": ({"type": "apem", "method": "gradient", "apem_params": {"max_steps": 300}, "max_images": 20, "seed": 1}, 6, 3),
    "evaluate": ({"type": "evaluate", "top_k": 2}, 8, 4),
    "overinterpretation": ({"type": "overinterpretation", "gallery_images": 3}, 8, 4),
    "audit": ({"type": "audit", "top_k": 2, "sigmas": [0.1, 0.3], "gallery_images": 1}, 4, 3),
    "criticism-mmd": ({**CRITICISM, "method": "mmd"}, 4, 3),
    "criticism-adversarial": ({**CRITICISM, "method": "adversarial"}, 4, 3),
    "criticism-probs": ({**CRITICISM, "method": "probs", "params": {"prototypes": 2, "low": 0.5, "high": 0.6}}, 4, 3),
    "criticism-random": ({**CRITICISM, "method": "random"}, 4, 0),  # no model calls to spread
}


@pytest.mark.parametrize("name", list(JOBS))
def test_a_fanned_out_job_gives_the_whole_jobs_result(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, redis: Redis, name: str
) -> None:
    """Each job type once whole and once in chunks: equal results (but the time), from the
    very same TorchServe calls (the fake's embed answers depend on the batch)."""
    settings = settings.model_copy(update={"embed_batch_size": 2})
    spec, threshold, expected_chunks = JOBS[name]
    job = {"model": "shapes-resnet", "dataset_id": shapes_dataset(client), **spec}
    results, sent, chunks = [], [], []
    for chunk_images in (0, threshold):
        fake_torchserve.State.requests.clear()
        with gateway(settings, chunk_images) as c:
            job_id = c.post("/v1/jobs", json=job).json()["job_id"]
            run_worker(settings, monkeypatch)
            assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "finished", c.get(f"/v1/jobs/{job_id}").json()
            results.append(_timeless(c.get(f"/v1/jobs/{job_id}/result").json()))
        sent.append(model_calls())
        chunks.append(chunk_jobs(redis, job_id))
    assert not chunks[0] and len(chunks[1]) == expected_chunks
    assert all(chunk.get_status() == JobStatus.FINISHED for chunk in chunks[1])
    for chunk in chunks[1]:  # the parts leave Redis soon after the reduce, not after the result TTL
        assert 0 < redis.ttl(chunk.key) <= CHUNKS_KEPT_S and 0 < redis.ttl(Result.get_key(chunk.id)) <= CHUNKS_KEPT_S
    assert results[1] == results[0] and sent[1] == sent[0]
    assert results[0]["type"] == spec["type"] and results[0]["model"] == "shapes-resnet"
    if spec["type"] == "overinterpretation":  # listed in sample order, not in the call order chunks follow
        manifest = DatasetStore(settings).get(job["dataset_id"])
        assert manifest is not None
        assert [i["file"] for i in results[0]["items"]] == [i["file"] for i in manifest["images"]]


def test_progress_is_the_chunks_weighted_by_their_images(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, redis: Redis
) -> None:
    settings = settings.model_copy(update={"embed_batch_size": 2})
    job = {"type": "evaluate", "model": "shapes-resnet", "dataset_id": shapes_dataset(client)}
    with gateway(settings, 8) as c:
        job_id = c.post("/v1/jobs", json=job).json()["job_id"]
        chunks = chunk_jobs(redis, job_id)
        sizes = [entry["stop"] - entry["start"] for entry in fetch(redis, job_id).meta["chunks"]]
        assert sizes == [6, 6, 8, 6]
        assert c.get(f"/v1/jobs/{job_id}").json() | {"created_at": None} == {
            "job_id": job_id, "type": "evaluate", "status": "queued", "progress": 0.0, "error": None,
            "created_at": None, "ended_at": None,
        }
        monkeypatch.setattr("service.jobs.tasks.get_settings", lambda: settings)
        build_worker(settings, Redis.from_url(settings.redis_url)).work(burst=True, max_jobs=1)  # the first chunk
        chunks[1].meta["progress"] = 0.5  # as the second one would report it, running
        chunks[1].save_meta()
        status = c.get(f"/v1/jobs/{job_id}").json()
        assert status["status"] == "started" and status["progress"] == pytest.approx((6 + 0.5 * 6) / 26)
        run_worker(settings, monkeypatch)
        status = c.get(f"/v1/jobs/{job_id}").json()
        assert status["status"] == "finished" and status["progress"] == 1.0 and status["ended_at"]


def test_cancelling_a_fanned_out_job_stops_and_cancels_its_chunks(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, redis: Redis
) -> None:
    """DELETE while the first chunk waits on TorchServe: that chunk is stopped, the queued
    ones and the reduce are canceled, and no other chunk ever calls TorchServe."""
    job = {"type": "apem", "model": "shapes-resnet", "dataset_id": shapes_dataset(client), "method": "gradient"}
    state = fake_torchserve.State
    with gateway(settings, 8) as c:
        job_id = c.post("/v1/jobs", json=job).json()["job_id"]
        seen: dict[str, Any] = {}

        def cancel_once_held() -> None:
            deadline = time.monotonic() + 30
            while state.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            seen["running"] = c.get(f"/v1/jobs/{job_id}").json()
            seen["deleted"] = c.delete(f"/v1/jobs/{job_id}")
            state.release.set()

        state.mode, state.waiting = "held", 0
        state.release.clear()
        canceller = threading.Thread(target=cancel_once_held)
        canceller.start()
        try:
            run_worker(settings, monkeypatch)
        finally:
            state.mode = "ok"
            state.release.set()
            canceller.join(10)
        assert seen["running"]["status"] == "started"
        assert seen["deleted"].status_code == 200 and seen["deleted"].json()["status"] == "canceled"
        assert [chunk.get_status() for chunk in chunk_jobs(redis, job_id)] == [
            JobStatus.STOPPED, JobStatus.CANCELED, JobStatus.CANCELED, JobStatus.CANCELED
        ]
        assert fetch(redis, job_id).get_status() == JobStatus.CANCELED
        assert [len(r["images"]) for r in state.requests if r["task"] == "apem_set"] == [8]  # the first call only
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 409
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"


def test_a_failed_chunk_fails_the_job_with_its_reason(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, redis: Redis
) -> None:
    """A chunk's job failure (TorchServe refuses one of its images) and a chunk out of
    retries (the model server busy) each fail the job with that chunk's reason, once the
    other chunks have ended."""
    dataset = shapes_dataset(client)
    manifest = DatasetStore(settings).get(dataset)
    assert manifest is not None
    square = next(i for i in manifest["images"] if i["file"] == "square/14.png")
    job = {"type": "apem", "model": "shapes-resnet", "dataset_id": dataset, "method": "gradient"}
    state = fake_torchserve.State
    with gateway(settings, 8) as c:
        state.refused = base64.b64encode(DatasetStore(settings).read_image(square["sha256"])).decode()
        try:
            refused = c.post("/v1/jobs", json=job).json()["job_id"]
            run_worker(settings, monkeypatch)
        finally:
            state.refused = None
        status = c.get(f"/v1/jobs/{refused}").json()
        failed = [chunk.get_status() == JobStatus.FAILED for chunk in chunk_jobs(redis, refused)]
        assert failed.count(True) == 1 and len(failed) == 4
        assert status["status"] == "failed" and "the image is unreadable" in status["error"]
        assert "the chunk of images" in status["error"] and "Traceback" not in status["error"]
        body = c.get(f"/v1/jobs/{refused}/result").json()
        assert body["error"]["code"] == "job_not_finished" and "the image is unreadable" in body["error"]["message"]
        state.mode = "busy"
        try:
            busy = c.post("/v1/jobs", json=job).json()["job_id"]
            run_worker(settings, monkeypatch)  # job_retries is 0 here: the first 503 exhausts them
        finally:
            state.mode = "ok"
        status = c.get(f"/v1/jobs/{busy}").json()
        assert status["status"] == "failed" and status["error"].startswith("model server unavailable")


def test_a_chunk_whose_worker_dies_is_retried_alone(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, redis: Redis, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A worker process is SIGKILLed while its chunk waits on TorchServe. Once its heartbeat
    lapses, the next worker retries that chunk (and no other), the reduce runs once, and
    the result is the whole job's."""
    settings = settings.model_copy(update={
        "job_retries": 1, "job_retry_intervals_s": [0], "worker_monitor_interval_s": 1, "worker_heartbeat_grace_s": 1,
    })
    job = {"type": "apem", "model": "shapes-resnet", "dataset_id": shapes_dataset(client), "method": "gradient"}
    state = fake_torchserve.State
    with gateway(settings, 0) as c:
        whole = c.post("/v1/jobs", json=job).json()["job_id"]
        run_worker(settings, monkeypatch)
        expected = _timeless(c.get(f"/v1/jobs/{whole}/result").json())
    whole_calls = [r for r in state.requests if r["task"] == "apem_set"]
    state.requests.clear()
    env = service_env(settings, **{
        "redis_url": settings.redis_url, "torchserve_url": settings.torchserve_url, "state_dir": str(settings.state_dir),
        "torchserve_key_file": str(settings.torchserve_key_file), "queue_name": settings.queue_name,
        "models": ",".join(settings.models), "job_retries": "1", "job_retry_intervals_s": "0",
        "worker_monitor_interval_s": "1", "worker_heartbeat_grace_s": "1",
    })
    with gateway(settings, 8) as c:
        job_id = c.post("/v1/jobs", json=job).json()["job_id"]
        state.mode, state.waiting = "held", 0
        state.release.clear()
        worker = worker_process(env, tmp_path / "worker.log").start()
        try:
            deadline = time.monotonic() + 120
            while state.waiting == 0 and time.monotonic() < deadline:
                assert worker.running(), (tmp_path / "worker.log").read_text()
                time.sleep(0.05)
            assert state.waiting == 1, "the worker process never called TorchServe"
            worker.kill()
        finally:
            worker.stop()
            state.mode = "ok"
            state.release.set()
        time.sleep(3)  # the killed worker's heartbeat (1 s + 1 s grace) lapses
        run_worker(settings, monkeypatch)
        status = c.get(f"/v1/jobs/{job_id}").json()
        assert status["status"] == "finished", status
        assert _timeless(c.get(f"/v1/jobs/{job_id}/result").json()) == expected
    assert sorted(chunk.retries_left for chunk in chunk_jobs(redis, job_id)) == [0, 1, 1, 1]
    reduce = fetch(redis, job_id)
    assert reduce.retries_left == 1 and len(reduce.results()) == 1
    calls_made = [r for r in state.requests if r["task"] == "apem_set"]
    assert len(calls_made) == len(whole_calls) + 1  # the killed call, made again; nothing else twice
    assert sorted(map(json.dumps, calls_made[1:])) == sorted(map(json.dumps, whole_calls))

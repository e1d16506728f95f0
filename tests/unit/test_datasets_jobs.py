"""Dataset archives and the job lifecycle (real Redis, the real worker class, fake TorchServe)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from protocol.arrays import decode_array
from protocol.contract import EncodedArray
from service.jobs.worker import build_worker
from service.settings import Settings
from tests.unit import fake_torchserve
from tests.unit.test_gateway import assert_error, png


def make_zip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out.getvalue()


def make_tar(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tf.addfile(link)
    return out.getvalue()


def colored(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6, 6), (i * 20 % 256, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def upload(client: TestClient, data: bytes):  # type: ignore[no-untyped-def]
    return client.post("/v1/datasets", files={"archive": ("d.zip", data, "application/zip")})


def test_dataset_roundtrip(client: TestClient) -> None:
    entries = {f"circle/{i}.png": colored(i) for i in range(4)}
    entries |= {
        "square/a.png": colored(9),
        "square/broken.png": b"\x89PNG\r\n\x1a\nxx",
        "readme.txt": b"hi",
        "metadata.json": b'{"source": "unit"}',
    }
    reply = upload(client, make_zip(entries))
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["classes"] == {"circle": 4, "square": 1} and body["n_images"] == 5
    assert {s["file"] for s in body["skipped"]} == {"square/broken.png", "readme.txt"}
    assert body["has_metadata"]
    again = upload(client, make_zip(entries)).json()
    assert again["dataset_id"] == body["dataset_id"]  # content-addressed
    tar_reply = upload(client, make_tar(entries))
    assert tar_reply.status_code == 201 and tar_reply.json()["dataset_id"] == body["dataset_id"]
    assert client.get(f"/v1/datasets/{body['dataset_id']}").json()["n_images"] == 5
    assert client.delete(f"/v1/datasets/{body['dataset_id']}").status_code == 200
    assert_error(client.get(f"/v1/datasets/{body['dataset_id']}"), 404, "dataset_not_found")
    assert_error(client.get("/v1/datasets/..%2F..%2Fetc"), 404)


@pytest.mark.parametrize(
    ("archive", "status", "code"),
    [
        (make_zip({"../evil/x.png": png()}), 422, "unsafe_archive"),
        (make_zip({"/abs/x.png": png()}), 422, "unsafe_archive"),
        (make_tar({"a/x.png": png()}, symlink="a/link.png"), 422, "unsafe_archive"),
        (make_zip({"a/x.txt": b"not an image"}), 422, "no_images"),
        (make_zip({f"a/{i}.png": png() for i in range(30)}), 413, "archive_too_many_files"),
        (
            make_zip({f"a/{i}.png": b"\x00" * 150_000 for i in range(8)}),
            413,
            "archive_too_large_unpacked",
        ),
        (b"not an archive at all", 415, "unsupported_archive"),
        (b"PK\x03\x04garbage", 422, "invalid_archive"),
    ],
)
def test_bad_archives(settings: Settings, archive: bytes, status: int, code: str) -> None:
    from service.gateway.app import create_app
    from tests.unit.conftest import API_KEY

    tight = settings.model_copy(
        update={"max_archive_files": 20, "max_archive_unpacked_bytes": 1_000_000}
    )
    with TestClient(create_app(tight), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert_error(upload(c, archive), status, code)


def test_dataset_routes_name_unknown_fields(client: TestClient) -> None:
    archive = make_zip({"circle/1.png": colored(1)})
    reply = client.post("/v1/datasets", files={"archive": ("d.zip", archive, "application/zip")}, data={"name": "x"})
    body = assert_error(reply, 422, "unknown_field")
    assert "'name'" in body["error"]["message"] and "archive" in body["error"]["message"]
    dataset = upload(client, archive).json()["dataset_id"]
    assert_error(client.get(f"/v1/datasets/{dataset}?verbose=1"), 422, "unknown_field")
    assert client.get(f"/v1/datasets/{dataset}").status_code == 200


def run_worker(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.jobs.tasks.get_settings", lambda: settings)
    worker = build_worker(settings, Redis.from_url(settings.redis_url))
    worker.work(burst=True)


def wait_status(client: TestClient, job_id: str, states: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{job_id}").json()
        if body["status"] in states:
            return body
        time.sleep(0.2)
    raise AssertionError(body)


@pytest.mark.parametrize("method", ["probs", "adversarial", "mmd", "random"])
def test_criticism_job_lifecycle(
    client: TestClient, settings: Settings, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = {f"circle/{i}.png": colored(i) for i in range(7)}
    dataset = upload(client, make_zip(entries)).json()["dataset_id"]
    job = {
        "type": "criticism",
        "model": "shapes-resnet",
        "dataset_id": dataset,
        "class_name": "circle",
        "method": method,
        "m": 2,
        "params": {"prototypes": 2, **({"low": 0.5, "high": 0.6} if method == "probs" else {})},
    }
    reply = client.post("/v1/jobs", json=job)
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    assert reply.json()["status_url"] == f"/v1/jobs/{job_id}"
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert (
        status["status"] == "queued" and status["progress"] == 0 and status["type"] == "criticism"
    )
    assert_error(client.get(f"/v1/jobs/{job_id}/result"), 409, "job_not_finished")
    run_worker(settings, monkeypatch)
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "finished" and status["progress"] == 1.0 and status["ended_at"]
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert len(result["criticisms"]) == 2 and result["n_candidates"] == 7
    # idempotent: the same job again gives the same selection, also with its TorchServe
    # calls in batches of 2 (the fake's answers depend on the batch) three at a time
    again = client.post("/v1/jobs", json=job).json()["job_id"]
    run_worker(settings, monkeypatch)
    assert client.get(f"/v1/jobs/{again}/result").json()["criticisms"] == result["criticisms"]
    batches = []
    for concurrency in (1, 3):
        split = settings.model_copy(update={"embed_batch_size": 2, "embed_concurrency": concurrency})
        batches.append(client.post("/v1/jobs", json=job).json()["job_id"])
        run_worker(split, monkeypatch)
    assert len({job_id, again, *batches}) == 4  # four runs, not one result served again
    if method == "adversarial":  # the attack's parameters are checked on arrival too
        for bad, where in (({"attack": "cw"}, "attack:"), ({"attack_params": {"steps": 0}}, "attack_params.steps"),
                           ({"attack": "pgd", "attack_params": {"epsilon": 2}}, "attack_params.epsilon"),
                           ({"attack_params": [1]}, "attack_params:")):
            body = assert_error(client.post("/v1/jobs", json={**job, "params": {**job["params"], **bad}}), 422)
            assert body["error"]["code"] == "invalid_params" and where in body["error"]["message"]
        fine = {"attack": "pgd", "attack_params": {"epsilon": 0.02, "steps": 3, "seed": 1}}
        assert client.post("/v1/jobs", json={**job, "params": {**job["params"], **fine}}).status_code == 202
    one, three = (client.get(f"/v1/jobs/{j}/result").json() for j in batches)
    assert one["criticisms"] == three["criticisms"] and one["prototypes"] == three["prototypes"]


def test_filter_job_and_failures(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, redis: Redis
) -> None:
    b64 = base64.b64encode(png()).decode()
    job = {"type": "filter", "model": "shapes-resnet", "method": "gradient", "image": b64}
    job_id = client.post("/v1/jobs", json=job).json()["job_id"]
    assert_error(client.post("/v1/jobs", json={**job, "image": "!!"}), 422, "invalid_image")
    assert_error(client.post("/v1/jobs", json={**job, "model": "nope"}), 404, "model_not_found")
    assert_error(client.post("/v1/jobs", json={**job, "method": "nope"}), 422, "unknown_method")
    for bad in ({"apem_params": {"shuffles": 0}}, {"filter_params": {"levels": 1}}, {"filter_params": {"x": 1}}):
        assert_error(client.post("/v1/jobs", json={**job, **bad}), 422, "invalid_params")
    assert_error(
        client.post(
            "/v1/jobs",
            json={
                "type": "criticism",
                "model": "shapes-resnet",
                "dataset_id": "0" * 32,
                "class_name": "a",
                "method": "mmd",
            },
        ),
        404,
        "dataset_not_found",
    )
    assert_error(
        client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
        422,
    )
    run_worker(settings, monkeypatch)
    assert client.get(f"/v1/jobs/{job_id}/result").json()["fraction_kept"] == 0.5
    # a criticism whose dataset vanished fails with a reason, not a trace
    entries = {f"circle/{i}.png": colored(i) for i in range(3)}
    dataset = upload(client, make_zip(entries)).json()["dataset_id"]
    failing = client.post(
        "/v1/jobs",
        json={
            "type": "criticism",
            "model": "shapes-resnet",
            "dataset_id": dataset,
            "class_name": "circle",
            "method": "probs",
            "m": 1,
        },
    ).json()["job_id"]
    client.delete(f"/v1/datasets/{dataset}")
    run_worker(settings, monkeypatch)
    status = client.get(f"/v1/jobs/{failing}").json()
    assert status["status"] == "failed" and "dataset not found" in status["error"]
    assert "Traceback" not in status["error"]
    assert_error(client.get(f"/v1/jobs/{failing}/result"), 409)
    # cancel a queued job; unknown and expired ids
    queued = client.post("/v1/jobs", json=job).json()["job_id"]
    assert client.delete(f"/v1/jobs/{queued}").json()["status"] == "canceled"
    assert_error(client.delete(f"/v1/jobs/{queued}"), 409, "job_ended")
    assert_error(client.get("/v1/jobs/" + "a" * 32), 404, "job_not_found")
    redis.delete(f"rq:job:{job_id}")  # what the result TTL does
    assert_error(client.get(f"/v1/jobs/{job_id}"), 410, "job_expired")
    assert_error(client.get(f"/v1/jobs/{job_id}/result"), 410, "job_expired")
    text = client.get("/metrics").text
    assert 'beyond_job_outcomes_total{outcome="finished",type="filter"}' in text


def test_a_filter_out_of_time_goes_on_in_further_calls(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two calls run out of time: each next call filters the map the last one reached, for
    the same target; the result counts all three calls."""
    fake_torchserve.State.filter_calls_out_of_time = 2
    b64 = base64.b64encode(png()).decode()
    job = {"type": "filter", "model": "shapes-resnet", "method": "gradient", "image": b64, "target": 1,
           "filter_params": {"levels": 16}}
    accepted = client.post("/v1/jobs", json=job)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    run_worker(settings, monkeypatch)
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    calls = [r for r in fake_torchserve.State.requests if r["task"] == "filter"]
    assert len(calls) == 3 and calls[0]["method"] == "gradient" and calls[0]["relevance"] is None
    for later in (1, 2):
        assert calls[later]["method"] is None and calls[later]["target"] == 1
        assert calls[later]["filter_params"] == {"levels": 16} and calls[later]["image"] == calls[0]["image"]
    sent = [decode_array(EncodedArray(**calls[i]["relevance"])) for i in (1, 2)]
    assert [float(a.max()) for a in sent] == [0.5, 0.25]  # what calls 1 and 2 had reached
    assert result["calls"] == 3 and result["stop"] == "apem_dropped" and result["method"] == "gradient"
    assert result["values_removed"] == 6 and result["candidates_scored"] == 9
    assert result["apem_before"] == 0.2 and result["fraction_kept"] == 0.125 and result["distinct_values"] == 8
    # a call out of time without progress would repeat forever: the job fails instead
    fake_torchserve.State.filter_calls_out_of_time, fake_torchserve.State.filter_values_removed = 1, 0
    stuck = client.post("/v1/jobs", json=job).json()["job_id"]
    run_worker(settings, monkeypatch)
    status = client.get(f"/v1/jobs/{stuck}").json()
    assert status["status"] == "failed" and "no progress" in status["error"]


def test_result_ttls_are_configured(client: TestClient, settings: Settings, redis: Redis) -> None:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    b64 = base64.b64encode(png()).decode()
    job_id = client.post(
        "/v1/jobs",
        json={"type": "filter", "model": "shapes-resnet", "method": "gradient", "image": b64},
    ).json()["job_id"]
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.result_ttl == settings.result_ttl_s >= 86400
    assert job.failure_ttl == settings.failure_ttl_s >= 86400
    assert job.timeout == settings.job_timeout_s


def test_apem_job_scores_a_dataset_and_correlates_with_the_loss(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake's APEM and loss both grow with an image's red level: Spearman rho is 1."""
    entries = {f"circle/{i}.png": colored(i) for i in range(1, 11)}
    entries.update({f"square/{i}.png": colored(i) for i in range(11, 14)})
    dataset = upload(client, make_zip(entries)).json()["dataset_id"]
    job = {"type": "apem", "model": "shapes-resnet", "dataset_id": dataset, "method": "gradient",
           "apem_params": {"max_steps": 300}}
    every = client.post("/v1/jobs", json=job).json()["job_id"]
    circles = client.post("/v1/jobs", json={**job, "class_name": "circle", "max_images": 4}).json()["job_id"]
    run_worker(settings, monkeypatch)
    assert client.get(f"/v1/jobs/{every}").json()["status"] == "finished"
    result = client.get(f"/v1/jobs/{every}/result").json()
    assert result["type"] == "apem" and result["n_scored"] == result["n_candidates"] == 13
    assert result["params"] == {"max_steps": 2000, **job["apem_params"]} and result["method"] == "gradient"
    items = result["items"]
    assert [i["class_name"] for i in items] == ["circle"] * 10 + ["square"] * 3  # two TorchServe calls
    assert [i["label"] for i in items] == [0] * 10 + [1] * 3
    assert result["apem"] == pytest.approx(sum(i["apem"] for i in items) / 13)
    assert result["spearman"]["rho"] == pytest.approx(1.0) and result["spearman"]["n"] == 13
    assert result["accuracy"] == pytest.approx(10 / 13)  # the fake predicts class 0
    sample = client.get(f"/v1/jobs/{circles}/result").json()
    assert sample["n_candidates"] == 10 and sample["n_scored"] == 4 and sample["class_name"] == "circle"
    again = client.post("/v1/jobs", json={**job, "class_name": "circle", "max_images": 4}).json()["job_id"]
    other = client.post("/v1/jobs", json={**job, "class_name": "circle", "max_images": 4, "seed": 1}).json()["job_id"]
    run_worker(settings, monkeypatch)
    files = [[i["file"] for i in client.get(f"/v1/jobs/{j}/result").json()["items"]] for j in (circles, again, other)]
    assert files[0] == files[1] != files[2]  # the sample is seeded
    assert files[0] == sorted(files[0], key=lambda f: [e["file"] for e in items].index(f))
    # refused at submission, with the reason
    assert_error(client.post("/v1/jobs", json={**job, "method": "nope"}), 422, "unknown_method")
    assert_error(client.post("/v1/jobs", json={**job, "class_name": "ring"}), 422, "unknown_class")
    assert_error(client.post("/v1/jobs", json={**job, "max_images": 2}), 422)
    body = assert_error(client.post("/v1/jobs", json={**job, "apem_params": {"max_steps": -1}}), 422, "invalid_params")
    assert "apem_params.max_steps" in body["error"]["message"]
    odd = upload(client, make_zip({"dog/1.png": colored(1), "circle/1.png": colored(2)})).json()["dataset_id"]
    body = assert_error(client.post("/v1/jobs", json={**job, "dataset_id": odd}), 422, "unknown_class")
    assert "'dog'" in body["error"]["message"]
    assert client.post("/v1/jobs", json={**job, "dataset_id": odd, "class_name": "circle"}).status_code == 202


SPLIT_JOBS = {
    "apem_set": {"type": "apem", "method": "gradient"},
    "sufficient_subsets": {"type": "overinterpretation", "gallery_images": 0},
    "robustness": {"type": "criticism", "class_name": "circle", "method": "adversarial", "m": 2, "params": {"prototypes": 2}},
    "embed": {"type": "criticism", "class_name": "circle", "method": "mmd", "m": 2, "params": {"prototypes": 2}},
    "noise_sensitivity": {"type": "audit", "top_k": 2, "sigmas": [0.1, 0.3], "gallery_images": 0},
}


def _timeless(result: dict) -> dict:
    """A job's result without the times it reports."""
    return {key: value for key, value in result.items() if key != "elapsed_ms"}


@pytest.mark.parametrize("task", list(SPLIT_JOBS))
def test_calls_out_of_time_are_split_until_they_fit(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    """Calls of more than three images run out of time: every job halves them (8 -> 4 -> 2,
    5 -> 2 + 3) and gets the result of an unhindered run; an image that does not fit alone
    fails the job with the reason."""
    entries = {f"circle/{i}.png": colored(i) for i in range(1, 14)}
    dataset = upload(client, make_zip(entries)).json()["dataset_id"]
    job = {"model": "shapes-resnet", "dataset_id": dataset, **SPLIT_JOBS[task]}
    settings = settings.model_copy(update={"embed_batch_size": 8})
    whole = client.post("/v1/jobs", json=job).json()["job_id"]
    run_worker(settings, monkeypatch)
    fake_torchserve.State.requests.clear()
    fake_torchserve.State.most_images = 3
    split = client.post("/v1/jobs", json=job).json()["job_id"]
    run_worker(settings, monkeypatch)
    sizes = [len(r["images"]) for r in fake_torchserve.State.requests if r["task"] == task]
    assert sizes == [8, 4, 2, 2, 4, 2, 2, 5, 2, 3]
    expected, got = (_timeless(client.get(f"/v1/jobs/{j}/result").json()) for j in (whole, split))
    assert got == expected
    fake_torchserve.State.most_images = 0
    stuck = client.post("/v1/jobs", json=job).json()["job_id"]
    run_worker(settings, monkeypatch)
    status = client.get(f"/v1/jobs/{stuck}").json()
    assert status["status"] == "failed" and status["error"].startswith("time_limit:")


def test_the_worker_side_of_jobs_does_not_import_torch() -> None:
    code = (
        "import sys; import service.jobs.tasks, service.jobs.reliability, protocol.ranking; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_audit_job_ranks_features_and_measures_accuracy_under_noise(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake's importances rank feature 3 first on red images and feature 1 on dark
    ones; its feature f flips every image once sigma * (f + 1) > 0.5 (a group: sigma *
    its largest feature); accuracies, drops, the gallery order and core/spurious accuracy
    [Singla2022, def. 2] follow from that."""
    entries = {f"circle/{i}.png": colored(i) for i in range(9, 13)}  # red 180..240 -> importance 9..12
    entries.update({f"square/{i}.png": colored(i) for i in range(1, 3)})  # red 20, 40 -> 1, 2
    dataset = upload(client, make_zip(entries)).json()["dataset_id"]
    job = {"type": "audit", "model": "shapes-resnet", "dataset_id": dataset, "top_k": 3,
           "sigmas": [0.1, 0.2, 0.3], "gallery_images": 2}
    every = client.post("/v1/jobs", json=job).json()["job_id"]
    grouped = client.post("/v1/jobs", json={**job, "class_name": "circle",
                                            "groups": {"spurious": [0], "core": [1, 3]}}).json()["job_id"]
    run_worker(settings, monkeypatch)
    status = client.get(f"/v1/jobs/{every}").json()
    assert status["status"] == "finished", status
    result = client.get(f"/v1/jobs/{every}/result").json()
    assert result["type"] == "audit" and result["sigmas"] == [0.1, 0.2, 0.3]
    circle, square = result["classes"]
    assert (circle["class_name"], circle["label"], circle["n_images"]) == ("circle", 0, 4)
    assert [f["feature"] for f in circle["features"]] == [3, 1, 2]
    assert [f["feature"] for f in square["features"]] == [1, 2, 3]
    assert circle["accuracy"] == 1.0 and square["accuracy"] == 0.0  # the fake predicts circle
    top = circle["features"][0]
    assert top["importance"] == pytest.approx(sum(20 * i / 20 for i in range(9, 13)) / 4)
    assert [n["accuracy"] for n in top["noise"]] == [1.0, 0.0, 0.0]  # 4 * sigma > 0.5 from 0.2 on
    assert [n["drop"] for n in circle["features"][1]["noise"]] == [0.0, 0.0, 1.0]  # 2 * sigma
    assert top["coverage"] == pytest.approx(0.3)
    gallery = circle["features"][2]["top_images"]  # feature 2's values are equal: dataset order
    assert [g["file"] for g in gallery] == ["circle/10.png", "circle/11.png"]
    shown = top["top_images"]  # feature 3's value is the red level: reddest first
    assert [g["file"] for g in shown] == ["circle/12.png", "circle/11.png"] and shown[0]["value"] == 240.0
    assert shown[0]["overlay_png"] == "b3Zlcg=="
    explained = [r for r in fake_torchserve.State.requests if r["task"] == "explain"]
    assert len(explained) == 2 * (3 + 3) + 2 * 3  # 2 images x 3 features, per class and job
    assert {(r["method"], r["colormap"], tuple(r["outputs"])) for r in explained} == {("nam", "jet", ("overlay_png",))}
    assert {r["params"]["feature"] for r in explained} == {1, 2, 3}
    noised = [r for r in fake_torchserve.State.requests if r["task"] == "noise_sensitivity"]
    first = next(r for r in noised if len(r["images"]) == 4)
    assert len(set(first["seeds"])) == 4 and first["features"] == [3, 1, 2]
    assert circle["groups"] == [] and circle["core_accuracy"] is None
    audited = client.get(f"/v1/jobs/{grouped}/result").json()["classes"]
    assert len(audited) == 1
    assert client.get(f"/v1/jobs/{grouped}/result").json()["groups"] == {"spurious": [0], "core": [1, 3]}
    assert result["gallery_images"] == 2 and result["groups"] == {}
    groups = {g["name"]: g for g in audited[0]["groups"]}
    assert groups["core"]["features"] == [1, 3]
    assert [n["accuracy"] for n in audited[0]["core_accuracy"]] == [1.0, 1.0, 1.0]  # spurious: max 0
    assert [n["accuracy"] for n in audited[0]["spurious_accuracy"]] == [1.0, 0.0, 0.0]  # core: max 3
    # top_k beyond the model's features: all of them; many masks x levels: fewer images per call
    levels = [0.05 * k for k in range(1, 9)]
    wide = client.post("/v1/jobs", json={**job, "class_name": "circle", "top_k": 20}).json()["job_id"]
    run_worker(settings, monkeypatch)
    fake_torchserve.State.requests.clear()
    client.post("/v1/jobs", json={**job, "class_name": "circle", "sigmas": levels,
                                  "groups": {f"g{k}": [k % 4] for k in range(8)}})
    run_worker(settings, monkeypatch)
    sizes = [len(r["images"]) for r in fake_torchserve.State.requests if r["task"] == "noise_sensitivity"]
    assert sizes == [2, 2]  # (3 features + 8 groups) x 8 levels = 88 masks: 256 // 88 = 2 images per call
    assert [f["feature"] for f in client.get(f"/v1/jobs/{wide}/result").json()["classes"][0]["features"]] == [3, 1, 2, 0]
    # refused at submission, with the reason
    assert_error(client.post("/v1/jobs", json={**job, "groups": {"core": [1]}}), 422, "invalid_params")
    assert_error(client.post("/v1/jobs", json={**job, "class_name": "ring"}), 422, "unknown_class")
    body = assert_error(client.post("/v1/jobs", json={**job, "top_k": 20, "gallery_images": 6}), 422, "invalid_params")
    assert "2 classes with top_k 20 and gallery_images 6 would return 240 overlays" in body["error"]["message"]
    assert client.post("/v1/jobs", json={**job, "class_name": "circle", "top_k": 20, "gallery_images": 10}).status_code == 202
    for bad in ({"sigmas": []}, {"sigmas": [0]}, {"top_k": 0}, {"gallery_images": 21}, {"nope": 1},
                {"class_name": "circle", "groups": {"core": []}}):
        assert_error(client.post("/v1/jobs", json={**job, **bad}), 422)


def test_evaluate_job_errors_rectified_by_votes(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[Stock2018, §3.1]. The fake ranks circle first for the first 7 of 10 images, then
    square: square/1 and both triangles are top-1 errors, the triangles top-2 errors too.
    Four of five raters found square relevant for triangle/1 (rectified), three of five
    circle for square/1 (not enough); triangle/2 has no votes, so it is the one to review."""
    entries = {f"circle/{i}.png": colored(i) for i in range(1, 7)}
    entries |= {f"square/{i}.png": colored(i) for i in (1, 2)}
    entries |= {f"triangle/{i}.png": colored(i) for i in (1, 2)}
    votes = "file,class_name,yes,raters\ntriangle/1.png,square,4,5\nsquare/1.png,circle,3,\n"
    dataset = upload(client, make_zip({**entries, "metadata.csv": votes.encode()})).json()["dataset_id"]
    job = {"type": "evaluate", "model": "shapes-resnet", "dataset_id": dataset, "top_k": 2}
    job_id = client.post("/v1/jobs", json=job).json()["job_id"]
    strict = client.post("/v1/jobs", json={**job, "agreement": 0.6, "review_limit": 0}).json()["job_id"]
    run_worker(settings, monkeypatch)
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["type"] == "evaluate" and result["n_images"] == 10 and result["top_k"] == 2
    assert (result["agreement"], result["review_limit"], result["max_images"]) == (0.8, 500, 20000)
    assert result["top1_error"] == pytest.approx(0.3) and result["topk_error"] == pytest.approx(0.2)
    assert result["rectified"] == {"agreement": 0.8, "top1_error": pytest.approx(0.2), "topk_error": pytest.approx(0.1),
                                   "misclassified_with_votes": 2}
    assert result["n_misclassified"] == 3
    (review,) = result["to_review"]
    assert review["file"] == "triangle/2.png" and [p["class_name"] for p in review["predictions"]] == ["square", "circle"]
    accuracy = {c["class_name"]: (c["n"], c["top1_accuracy"], c["topk_accuracy"]) for c in result["per_class"]}
    assert accuracy == {"circle": (6, 1.0, 1.0), "square": (2, 0.5, 1.0), "triangle": (2, 0.0, 0.0)}
    assert result["confusions"] == [{"class_name": "triangle", "predicted": "square", "count": 2},
                                    {"class_name": "square", "predicted": "circle", "count": 1}]
    lenient = client.get(f"/v1/jobs/{strict}/result").json()
    assert lenient["rectified"]["top1_error"] == pytest.approx(0.1) and lenient["to_review"] == []
    # a dataset without votes: no rectified errors; malformed votes: refused on arrival
    plain = upload(client, make_zip(entries)).json()["dataset_id"]
    plain_id = client.post("/v1/jobs", json={**job, "dataset_id": plain, "class_name": "triangle"}).json()["job_id"]
    run_worker(settings, monkeypatch)
    alone = client.get(f"/v1/jobs/{plain_id}/result").json()
    assert alone["rectified"] is None and alone["n_images"] == 2 and alone["n_candidates"] == 2
    bad = upload(client, make_zip({**entries, "metadata.csv": b"file,class_name,yes,raters\ncircle/1.png,square,7,5\n"}))
    body = assert_error(client.post("/v1/jobs", json={**job, "dataset_id": bad.json()["dataset_id"]}), 422, "invalid_metadata")
    assert "votes row 1" in body["error"]["message"]
    assert_error(client.post("/v1/jobs", json={**job, "agreement": 0}), 422)


def grey(level: int, size: int = 6) -> bytes:
    out = io.BytesIO()
    Image.new("L", (size, size), level).save(out, format="PNG")
    return out.getvalue()


def test_region_masks_upload_and_audit(client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Masks under _masks/<kind>/<image path> attach to their images (Singla & Feizi's annotated
    regions [Singla2022, §5.1]); strays are reported. The fake flips an image once sigma x its mask's level
    passes 0.2: white core masks flip from sigma 0.25, dark spurious ones (level 0.2) never."""
    entries = {f"circle/{i}.png": colored(i) for i in range(1, 4)}
    entries |= {f"_masks/core/circle/{i}.png": grey(255) for i in range(1, 4)}
    entries |= {"_masks/spurious/circle/1.png": grey(51), "_masks/spurious/circle/2.png": grey(51),
                "_masks/spurious/circle/3.png": grey(51, size=5), "_masks/core/circle/9.png": grey(255),
                "_masks/other/circle/1.png": grey(255)}
    reply = upload(client, make_zip(entries))
    assert reply.status_code == 201, reply.text
    dataset = reply.json()
    assert dataset["classes"] == {"circle": 3} and dataset["masks"] == {"core": 3, "spurious": 2}
    reasons = {s["file"]: s["reason"] for s in dataset["skipped"]}
    assert reasons["_masks/spurious/circle/3.png"] == "mask is 5x5, its image 6x6"
    assert reasons["_masks/core/circle/9.png"] == "a mask of no image in the archive"
    assert "_masks/core/ or _masks/spurious/" in reasons["_masks/other/circle/1.png"]
    plain = upload(client, make_zip({f"circle/{i}.png": colored(i) for i in range(1, 4)})).json()
    assert plain["dataset_id"] != dataset["dataset_id"] and plain["masks"] == {"core": 0, "spurious": 0}
    other = upload(client, make_zip({"square/1.png": colored(5)})).json()["dataset_id"]
    assert client.delete(f"/v1/datasets/{other}").status_code == 200  # collects unreferenced blobs
    blobs = {p.stem for p in (settings.data_path / "blobs").glob("*/*.png")}
    manifest = json.loads((settings.data_path / "datasets" / f"{dataset['dataset_id']}.json").read_text())
    assert {sha for i in manifest["images"] for sha in i["masks"].values()} <= blobs  # masks survive
    job = {"type": "audit", "model": "shapes-resnet", "dataset_id": dataset["dataset_id"], "top_k": 1,
           "sigmas": [0.1, 0.25, 0.5], "gallery_images": 0}
    with_masks = client.post("/v1/jobs", json=job).json()["job_id"]
    without = client.post("/v1/jobs", json={**job, "dataset_id": plain["dataset_id"]}).json()["job_id"]
    run_worker(settings, monkeypatch)
    (audited,) = client.get(f"/v1/jobs/{with_masks}/result").json()["classes"]
    regions = {a["kind"]: a for a in audited["annotated"]}
    assert (regions["core"]["n_images"], regions["spurious"]["n_images"]) == (3, 2)
    assert regions["core"]["coverage"] == pytest.approx(1.0) and regions["spurious"]["coverage"] == pytest.approx(0.2)
    assert [n["accuracy"] for n in audited["annotated_spurious_accuracy"]] == [1.0, 0.0, 0.0]
    assert [n["accuracy"] for n in audited["annotated_core_accuracy"]] == [1.0, 1.0, 1.0]
    sent = [r for r in fake_torchserve.State.requests if r["task"] == "mask_sensitivity"]
    assert sorted(len(r["masks"]) for r in sent) == [2, 3]
    (bare,) = client.get(f"/v1/jobs/{without}/result").json()["classes"]
    assert bare["annotated"] == [] and bare["annotated_core_accuracy"] is None


def test_a_generated_split_uploads_with_its_region_masks(client: TestClient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """model_store.region_masks writes the generator's masks where the upload finds them."""
    import numpy as np

    from model_store.region_masks import write_region_masks
    from model_store.shapes import ShapesConfig, generate, load_split
    from service.client import folder_archive

    root = generate(ShapesConfig(sizes={"train": 6, "test": 40, "counterfactual": 6}), tmp_path / "shapes")
    split_dir = root / "test"
    split = load_split(root, "test")
    planted = int(split.spurious_masks.any(axis=(1, 2)).sum())
    assert 0 < planted < 40
    assert write_region_masks(split_dir) == {"core": 40, "spurious": planted}
    first = split.attributes[0]["file"]
    written = np.asarray(Image.open(split_dir / "_masks" / "core" / first)) > 127
    assert np.array_equal(written, split.core_masks[0])
    reply = upload(client, folder_archive(split_dir))
    assert reply.status_code == 201, reply.text
    dataset = reply.json()
    assert dataset["n_images"] == 40 and dataset["masks"] == {"core": 40, "spurious": planted}
    assert {s["file"] for s in dataset["skipped"]} == {"metadata.jsonl", "core_masks.npy", "spurious_masks.npy"}


def test_overinterpretation_job_summarises_subsets_per_class_and_region(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[Carter2021]. The fake's subset of an image is its red level / 255 of the pixels (none for
    black), the label's probability with 5 % kept is 1 - that, and a subset's share on a region
    is the region mask's level: the summaries, the gallery order and the grouping of calls by
    the masks uploaded follow from that."""
    entries = {f"circle/{i}.png": colored(i) for i in range(5)}  # red 0, 20, .., 80
    entries |= {f"square/{i}.png": colored(i) for i in (5, 6)}  # red 100, 120
    entries |= {f"_masks/core/circle/{i}.png": grey(255) for i in (1, 2, 3)}
    entries |= {f"_masks/spurious/circle/{i}.png": grey(51) for i in (1, 2)}
    dataset = upload(client, make_zip(entries)).json()["dataset_id"]
    job = {"type": "overinterpretation", "model": "shapes-resnet", "dataset_id": dataset, "gallery_images": 2}
    job_id = client.post("/v1/jobs", json=job).json()["job_id"]
    run_worker(settings, monkeypatch)
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "finished", status
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["type"] == "overinterpretation" and result["params"]["threshold"] == 0.9
    assert (result["n_images"], result["n_candidates"], result["kept_fraction"]) == (7, 7, 0.05)
    assert result["accuracy"] == pytest.approx(5 / 7)  # the fake predicts circle
    assert result["confident_when_kept"] == pytest.approx(2 / 7)  # red 0 and 20: 1 - r >= 0.9
    assert result["with_subset"] == pytest.approx(6 / 7) and result["median_subset"] == pytest.approx(70 / 255)
    circle, square = result["per_class"]
    assert (circle["class_name"], circle["n_images"], circle["accuracy"]) == ("circle", 5, 1.0)
    assert circle["median_subset"] == pytest.approx(50 / 255) and square["accuracy"] == 0.0
    assert circle["regions"] == {
        "core": {"n_images": 3, "subset_share": pytest.approx(1.0), "coverage": 0.5},
        "spurious": {"n_images": 2, "subset_share": pytest.approx(0.2), "coverage": 0.5},
    }
    assert square["regions"] == {} and result["regions"]["core"]["n_images"] == 3
    assert [g["file"] for g in result["gallery"]] == ["circle/1.png", "circle/2.png"]
    assert result["gallery"][0]["subset_png"] == "c3Vic2V0"
    items = {i["file"]: i for i in result["items"]}
    assert items["circle/0.png"]["sis_fraction"] is None and items["square/6.png"]["label"] == 1
    assert items["circle/3.png"]["region_share"] == {"core": pytest.approx(1.0)}
    sent = [r for r in fake_torchserve.State.requests if r["task"] == "sufficient_subsets"]
    assert sorted((len(r["images"]), tuple(sorted(r["regions"]))) for r in sent) == [
        (1, ("core",)), (2, ("core", "spurious")), (4, ())
    ]
    shown = [r for r in fake_torchserve.State.requests if r["task"] == "explain"]
    assert [(r["method"], r["target"], r["outputs"]) for r in shown] == [("sis", 0, ["attention_png"])] * 2
    # a finer step: fewer images per call (at most 8 x 51 image-passes: 2 x 201, 1 x 1001)
    fake_torchserve.State.requests.clear()
    client.post("/v1/jobs", json={**job, "params": {"step_fraction": 0.005}, "gallery_images": 0})
    client.post("/v1/jobs", json={**job, "class_name": "square", "params": {"step_fraction": 0.001}, "gallery_images": 0})
    run_worker(settings, monkeypatch)
    sizes = [len(r["images"]) for r in fake_torchserve.State.requests if r["task"] == "sufficient_subsets"]
    assert sizes == [2, 2, 2, 1] + [1, 1]
    # refused at submission, with the reason
    body = assert_error(client.post("/v1/jobs", json={**job, "params": {"threshold": 2}}), 422, "invalid_params")
    assert "params.threshold" in body["error"]["message"]
    assert_error(client.post("/v1/jobs", json={**job, "class_name": "ring"}), 422, "unknown_class")
    for bad in ({"gallery_images": 51}, {"max_images": 0}, {"params": {"nope": 1}}):
        assert_error(client.post("/v1/jobs", json={**job, **bad}), 422)

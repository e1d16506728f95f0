"""The load-test report: percentiles, failures by status, capacity steps, objectives, plot.

Built from synthetic samples whose answers are known; Locust itself is not imported (it
monkey-patches the process with gevent).
"""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from load_tests import report
from load_tests.run import parse_duration, require_loopback

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


def write_samples(path: Path, rows: list[tuple[float, str, float, int, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["end_s", "name", "latency_ms", "status", "retry_after"])
        for end, name, latency, status, retry in rows:
            writer.writerow([f"{T0 + end:.3f}", name, latency, status, retry])
    return path


def test_route_stats_and_failures(tmp_path: Path) -> None:
    rows = [(i * 0.1, "POST /predict", float(i + 1), 200, "") for i in range(100)]
    rows += [(1.0, "POST /predict", 5.0, 429, "1"), (2.0, "POST /explain lime", 900.0, 0, "")]
    rows += [(3.0, "POST /explain lime", 700.0, 200, ""), (4.0, "POST /jobs", 9.0, 503, "2")]
    samples = report.Samples.read(write_samples(tmp_path / "s.csv", rows))
    stats = {s.name: s for s in report.route_stats(samples, duration_s=10)}
    predict = stats["POST /predict"]
    assert (predict.requests, predict.failures, predict.rps) == (101, 1, 10.1)
    latencies = np.array([float(i + 1) for i in range(100)] + [5.0])
    assert predict.p50_ms == round(float(np.percentile(latencies, 50)), 1)
    assert predict.p95_ms == round(float(np.percentile(latencies, 95)), 1)
    assert predict.p99_ms == round(float(np.percentile(latencies, 99)), 1)
    assert stats["all"].requests == 104 and stats["all"].failures == 3
    assert report.failures_by_status(samples) == {
        "POST /predict": {"429": 1},
        "POST /explain lime": {"0": 1},
        "POST /jobs": {"503": 1},
    }
    checks = report.evaluate(
        {"max_error_rate": 0.05, "p95_ms": {"POST /predict": 100}}, list(stats.values())
    )
    assert [c["ok"] for c in checks] == [True, True]
    checks = report.evaluate(
        {"max_error_rate": 0.01, "p95_ms": {"POST /predict": 50}}, list(stats.values())
    )
    assert [c["ok"] for c in checks] == [False, False]
    missing = report.evaluate(
        {"max_error_rate": 1, "p95_ms": {"GET /nothing": 50}}, list(stats.values())
    )
    assert missing[1]["ok"] is False


def capacity_rows() -> list[tuple[float, str, float, int, str]]:
    """Steps of 10 s at 10, 20, 40 req/s offered and a 10 req/s recovery step: the server
    keeps up to 20 req/s; at 40 it answers half with fast 429s and the rest slowly."""
    rows: list[tuple[float, str, float, int, str]] = []
    plan = [(10, 50.0, 0.0), (20, 80.0, 0.0), (40, 900.0, 0.5), (10, 60.0, 0.0)]
    for index, (rate, latency, refused) in enumerate(plan):
        start = index * 10.0
        rows.append((start, report.STEP, float(rate), -1, ""))
        for k in range(rate * 10):
            end = start + (k + 0.5) / rate
            if refused and k % 2 == 0:
                rows.append((end, "POST /predict", 2.0, 429, "1"))
            else:
                rows.append((end, "POST /predict", latency, 200, ""))
    return rows


def test_capacity_steps(tmp_path: Path) -> None:
    samples = report.Samples.read(write_samples(tmp_path / "s.csv", capacity_rows()))
    assert [rate for _, rate in samples.steps] == [10, 20, 40, 10]
    steps = report.step_results(samples, T0 + 40, 500, 0.01, 0.95)
    assert [s.offered_rps for s in steps] == [10, 20, 40, 10]
    assert [s.within_objective for s in steps] == [True, True, False, True]
    assert steps[0].achieved_rps == pytest.approx(10, abs=0.5)
    assert steps[2].rejected_429 > 0 and steps[2].p95_429_ms == 2.0
    assert steps[2].error_rate == pytest.approx(0.5, abs=0.05)
    assert report.capacity_of(steps) == 20
    stats = report.route_stats(samples, 40)
    objectives = {"max_error_rate": 0.01, "max_overload_latency_ms": 100, "p95_ms": {}}
    checks = {c["objective"]: c for c in report.evaluate(objectives, stats, steps, samples)}
    assert checks["capacity (req/s)"]["value"] == 20 and checks["capacity (req/s)"]["ok"]
    assert checks["p95 of 429 answers (ms)"]["ok"]
    assert checks["requests without an answer (timeouts)"]["ok"]
    assert all(c["ok"] for c in checks.values())


def test_capacity_misses_on_timeouts_and_no_recovery(tmp_path: Path) -> None:
    rows = capacity_rows()
    rows = [
        r if r[0] < 30 else (r[0], r[1], 30000.0, 0, "") if r[1] != report.STEP else r for r in rows
    ]
    samples = report.Samples.read(write_samples(tmp_path / "s.csv", rows))
    steps = report.step_results(samples, T0 + 40, 500, 0.01, 0.95)
    objectives = {"max_error_rate": 0.01, "max_overload_latency_ms": 100, "p95_ms": {}}
    checks = {
        c["objective"]: c["ok"]
        for c in report.evaluate(objectives, report.route_stats(samples, 40), steps, samples)
    }
    assert checks["requests without an answer (timeouts)"] is False
    assert checks["recovered at 10 req/s (p95 ms, error rate)"] is False


def test_build_report_writes_files(tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "samples.csv", capacity_rows())
    config = tomllib.loads((REPO / "load_tests" / "config.toml").read_text())
    built = report.build_report(
        samples, tmp_path, 40.0, config["objectives"], config["capacity"],
        {"target": "http://127.0.0.1:1", "users": "stepped"},
    )  # fmt: skip
    assert built["capacity_rps"] == 20
    assert json.loads((tmp_path / "report.json").read_text())["capacity_rps"] == 20
    text = (tmp_path / "report.md").read_text()
    assert "Capacity: **20.0 req/s**" in text and "| POST /predict |" in text
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_is_complete() -> None:
    config = tomllib.loads((REPO / "load_tests" / "config.toml").read_text())
    assert {"run", "data", "mix", "explain", "attack", "job", "capacity", "objectives"} <= set(
        config
    )
    assert config["mix"]["predict"] > max(config["mix"]["explain"], config["mix"]["attack"])
    assert "POST /predict" in config["objectives"]["p95_ms"]
    rates = [float(step.split(":")[0]) for step in config["capacity"]["steps"].split(",")]
    assert rates[-1] < max(rates), "the last step must drop the load to check recovery"


def test_duration_and_loopback() -> None:
    assert parse_duration("90") == 90 and parse_duration("90s") == 90
    assert parse_duration("5m") == 300 and parse_duration("1h30m") == 5400
    with pytest.raises(ValueError):
        parse_duration("5x")
    require_loopback("http://127.0.0.1:8000")
    require_loopback("http://localhost:8000")
    for url in ("http://10.0.0.1:8000", "http://192.168.1.2", "http://8.8.8.8"):
        with pytest.raises(SystemExit):
            require_loopback(url)

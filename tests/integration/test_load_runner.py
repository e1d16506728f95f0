"""The headless load-test runner end to end, briefly, against the session's real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from load_tests.report import Samples
from tests.integration.conftest import API_KEY, REPO, Stack

pytestmark = pytest.mark.integration


def run(stack: Stack, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BEYOND_LOAD_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "load_tests.run", "--url", stack.base_url, "--no-start"]
    command += ["--out", str(out), *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_mixed_run_writes_the_report(stack: Stack, tmp_path: Path) -> None:
    done = run(stack, tmp_path, "--users", "3", "--spawn-rate", "3", "--duration", "8s")
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: an objective missed
    built = json.loads((tmp_path / "report.json").read_text())
    routes = {r["name"]: r for r in built["routes"]}
    assert routes["POST /predict"]["requests"] > 0
    assert routes["all"]["p95_ms"] >= routes["all"]["p50_ms"] > 0
    assert {c["objective"] for c in built["objectives"]} >= {"error rate", "p95 POST /predict (ms)"}
    assert (done.returncode == 0) == all(c["ok"] for c in built["objectives"])
    assert (tmp_path / "latency.png").stat().st_size > 1000
    assert "| route | requests |" in done.stdout


def test_runner_refuses_other_hosts(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "load_tests.run", "--url", "http://192.0.2.1:8000"]
    done = subprocess.run(
        command + ["--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode != 0 and "loopback" in done.stderr


def test_capacity_steps_offer_a_steady_rate(stack: Stack, tmp_path: Path) -> None:
    """40 users started together at 1 request/s each: about 8 requests sent per 200 ms, no bursts.

    With Locust's own pacing every user fired in the same instant once per second (all 40
    requests inside one or two 200 ms bins, and the gateway's in-flight bound refusing them):
    most bins empty, and five or more bins over 16 in the 5 s looked at. The bins count when
    requests were sent, not when their answers came (CI once saw 3, 0, then 24 answers in
    three bins: a pause of the stack bunches answers), and one pause of the machine may still
    bunch the sends due during it into a bin or two.
    """
    done = run(stack, tmp_path, "--capacity", "--steps", "40:8,5:2")
    assert done.returncode in (0, 1), done.stdout + done.stderr
    samples = Samples.read(tmp_path / "samples.csv")
    (start, rate), (end, _) = samples.steps[:2]
    assert rate == 40
    sent = samples.start_s[samples.names == "POST /predict"]
    steady = sent[(sent > start + 2.0) & (sent < end - 1.0)]  # 5 s inside the 40 req/s step
    per_200ms = np.bincount(((steady - start - 2.0) * 5).astype(int))
    assert 120 <= len(steady) <= 240  # about 40 req/s for 5 s
    assert np.median(per_200ms) >= 5 and (per_200ms > 16).sum() <= 2, per_200ms.tolist()

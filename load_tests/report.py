"""From the per-request samples of a Locust run to the report: tables, objectives, a plot.

The samples CSV (written by ``load_tests/locustfile.py``) has one row per request:
``end_s`` (Unix time it ended), ``name``, ``latency_ms``, ``status`` (0: no answer) and
``retry_after``; rows named ``__step__`` mark the start of a capacity step (the offered
rate in ``latency_ms``). Percentiles are computed on the raw latencies, not on buckets.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STEP = "__step__"
TRANSIENT_S = 3.0  # the first seconds of a capacity step are not judged


@dataclass
class Samples:
    end_s: np.ndarray
    latency_ms: np.ndarray
    status: np.ndarray
    names: np.ndarray
    retry_after: np.ndarray
    steps: list[tuple[float, float]] = field(default_factory=list)  # (start_s, offered rate)

    @classmethod
    def read(cls, path: Path) -> Samples:
        rows, steps = [], []
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row["name"] == STEP:
                    steps.append((float(row["end_s"]), float(row["latency_ms"])))
                else:
                    rows.append(row)
        return cls(
            end_s=np.array([float(r["end_s"]) for r in rows]),
            latency_ms=np.array([float(r["latency_ms"]) for r in rows]),
            status=np.array([int(r["status"]) for r in rows], dtype=int),
            names=np.array([r["name"] for r in rows], dtype=object),
            retry_after=np.array([r["retry_after"] for r in rows], dtype=object),
            steps=steps,
        )

    def __len__(self) -> int:
        return len(self.end_s)

    def where(self, mask: np.ndarray) -> Samples:
        return Samples(
            self.end_s[mask],
            self.latency_ms[mask],
            self.status[mask],
            self.names[mask],
            self.retry_after[mask],
            self.steps,
        )

    @property
    def start_s(self) -> np.ndarray:
        """When each request was sent: its end less its latency (the pacing the users kept)."""
        return self.end_s - self.latency_ms / 1000.0

    @property
    def failed(self) -> np.ndarray:
        return (self.status == 0) | (self.status >= 400)


def _pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if len(values) else float("nan")


@dataclass
class RouteStats:
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def route_stats(samples: Samples, duration_s: float) -> list[RouteStats]:
    """Per request name, then ``all``: counts, rate and latency percentiles."""
    out = []
    names = sorted(set(samples.names)) + ["all"]
    for name in names:
        part = samples if name == "all" else samples.where(samples.names == name)
        lat = part.latency_ms
        out.append(
            RouteStats(
                name,
                len(part),
                int(part.failed.sum()),
                round(len(part) / duration_s, 2) if duration_s > 0 else 0.0,
                _pct(lat, 50),
                _pct(lat, 95),
                _pct(lat, 99),
                round(float(lat.max()), 1) if len(lat) else float("nan"),
            )
        )
    return out


def failures_by_status(samples: Samples) -> dict[str, dict[str, int]]:
    """name -> {status: count} for failed requests (status ``0``: no answer / timeout)."""
    out: dict[str, dict[str, int]] = {}
    failed = samples.where(samples.failed)
    for name, status in zip(failed.names, failed.status, strict=True):
        per = out.setdefault(str(name), {})
        per[str(status)] = per.get(str(status), 0) + 1
    return out


@dataclass
class StepResult:
    offered_rps: float
    achieved_rps: float
    ok_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    error_rate: float
    rejected_429: int
    busy_503: int
    no_answer: int
    p95_429_ms: float
    within_objective: bool


def step_results(
    samples: Samples, end_s: float, p95_objective_ms: float, max_error_rate: float,
    min_achieved: float,
) -> list[StepResult]:  # fmt: skip
    """Judge each capacity step on the requests that ended inside it (after its transient)."""
    out = []
    bounds = [start for start, _ in samples.steps[1:]] + [end_s]
    for (start, rate), stop in zip(samples.steps, bounds, strict=True):
        begin = start + TRANSIENT_S
        window = max(stop - begin, 1e-9)
        part = samples.where((samples.end_s >= begin) & (samples.end_s < stop))
        n = len(part)
        failed = int(part.failed.sum())
        error_rate = failed / n if n else 1.0
        achieved = n / window
        p95 = _pct(part.latency_ms, 95)
        rejected = part.where(part.status == 429)
        out.append(
            StepResult(
                offered_rps=rate,
                achieved_rps=round(achieved, 1),
                ok_rps=round((n - failed) / window, 1),
                p50_ms=_pct(part.latency_ms, 50),
                p95_ms=p95,
                p99_ms=_pct(part.latency_ms, 99),
                error_rate=round(error_rate, 4),
                rejected_429=len(rejected),
                busy_503=int((part.status == 503).sum()),
                no_answer=int((part.status == 0).sum()),
                p95_429_ms=_pct(rejected.latency_ms, 95),
                within_objective=bool(
                    n > 0
                    and achieved >= min_achieved * rate
                    and p95 <= p95_objective_ms
                    and error_rate <= max_error_rate
                ),
            )
        )
    return out


def capacity_of(steps: list[StepResult]) -> float | None:
    """The highest offered rate (recovery step excluded) judged within the objective."""
    good = [s.offered_rps for s in steps[:-1] if s.within_objective]
    return max(good) if good else None


def evaluate(
    objectives: dict[str, Any],
    stats: list[RouteStats],
    steps: list[StepResult] | None = None,
    overall: Samples | None = None,
) -> list[dict[str, Any]]:
    """Each stated objective with its measured value and whether it was met."""
    checks: list[dict[str, Any]] = []
    by_name = {s.name: s for s in stats}
    if steps is None:
        total = by_name.get("all")
        rate = total.failures / total.requests if total and total.requests else 1.0
        limit = float(objectives["max_error_rate"])
        checks.append(_check("error rate", round(rate, 4), f"<= {limit}", rate <= limit))
        for name, limit_ms in objectives.get("p95_ms", {}).items():
            route = by_name.get(name)
            value = route.p95_ms if route else float("nan")
            ok = route is not None and value <= float(limit_ms)
            checks.append(_check(f"p95 {name} (ms)", value, f"<= {limit_ms}", ok))
        return checks
    capacity = capacity_of(steps)
    checks.append(
        _check("capacity (req/s)", capacity, "a step within the objectives", capacity is not None)
    )
    overload = [s for s in steps[:-1] if s.rejected_429]
    worst = max((s.p95_429_ms for s in overload), default=float("nan"))
    limit_ms = float(objectives["max_overload_latency_ms"])
    checks.append(
        _check(
            "p95 of 429 answers (ms)", worst, f"<= {limit_ms}", not overload or worst <= limit_ms
        )
    )
    no_answer = int((overall.status == 0).sum()) if overall is not None else 0
    checks.append(
        _check("requests without an answer (timeouts)", no_answer, "== 0", no_answer == 0)
    )
    last = steps[-1]
    checks.append(
        _check(
            f"recovered at {last.offered_rps:g} req/s (p95 ms, error rate)",
            [last.p95_ms, last.error_rate],
            "within the objectives",
            last.within_objective,
        )
    )
    return checks


def _check(objective: str, value: Any, target: str, ok: bool) -> dict[str, Any]:
    return {"objective": objective, "value": value, "target": target, "ok": bool(ok)}


# --------------------------------------------------------------------------- plot
def plot(samples: Samples, path: Path, bin_s: float = 2.0) -> None:
    """Latency (p50 dashed, p95 solid, per route) and throughput (ok / failed) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not len(samples):
        return
    t0 = min([samples.end_s.min()] + [start for start, _ in samples.steps])
    t = samples.end_s - t0
    edges = np.arange(0, t.max() + bin_s, bin_s)
    centers = edges[:-1] + bin_s / 2
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    names = [n for n in sorted(set(samples.names)) if (samples.names == n).sum() >= 20]
    for index, name in enumerate(names):
        mask = samples.names == name
        color = f"C{index % 10}"
        for q, style in ((50, "--"), (95, "-")):
            values = []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                sel = samples.latency_ms[mask & (t >= lo) & (t < hi)]
                values.append(np.percentile(sel, q) if len(sel) else np.nan)
            label = f"{name} p{q}"
            top.plot(centers, values, style, color=color, label=label, linewidth=1.2)
    for q, style in ((95, "-"),):
        values = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = samples.latency_ms[(t >= lo) & (t < hi)]
            values.append(np.percentile(sel, q) if len(sel) else np.nan)
        top.plot(centers, values, style, color="k", label="all requests p95", linewidth=0.8)
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.legend(fontsize=7, ncol=2, loc="upper left")
    top.grid(True, which="both", alpha=0.3)
    ok, _ = np.histogram(t[~samples.failed], bins=edges)
    bad, _ = np.histogram(t[samples.failed], bins=edges)
    bottom.bar(centers, ok / bin_s, width=bin_s, color="C2", label="answered 2xx/3xx")
    bottom.bar(centers, bad / bin_s, width=bin_s, bottom=ok / bin_s, color="C3", label="failed")
    if samples.steps:
        starts = [start - t0 for start, _ in samples.steps] + [t.max()]
        rates = [rate for _, rate in samples.steps] + [samples.steps[-1][1]]
        bottom.step(starts, rates, where="post", color="k", linewidth=1, label="offered")
    bottom.set_ylabel("requests / s")
    bottom.set_xlabel("seconds since start")
    bottom.legend(fontsize=8, loc="upper left")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Load test: {report['mode']}", "", f"- target: {report['target']}"]
    lines += [f"- {k}: {report['run'][k]}" for k in sorted(report["run"])]
    lines += ["", "| route | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for s in report["routes"]:
        lines.append(
            f"| {s['name']} | {s['requests']} | {s['failures']} | {s['rps']} | {s['p50_ms']} | "
            f"{s['p95_ms']} | {s['p99_ms']} | {s['max_ms']} |"
        )
    lines += ["", "Failures by status (0: no answer):", ""]
    if report["failures"]:
        for name, per in report["failures"].items():
            lines.append(f"- {name}: " + ", ".join(f"{k}: {v}" for k, v in sorted(per.items())))
    else:
        lines.append("- none")
    if report.get("steps"):
        lines += ["", "| offered req/s | achieved | ok req/s | p50 ms | p95 ms | p99 ms | "
                  "error rate | 429 | 503 | no answer | p95 of 429 ms | within objective |"]  # fmt: skip
        lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in report["steps"]:
            lines.append(
                f"| {s['offered_rps']:g} | {s['achieved_rps']} | {s['ok_rps']} | {s['p50_ms']} | "
                f"{s['p95_ms']} | {s['p99_ms']} | {s['error_rate']} | {s['rejected_429']} | "
                f"{s['busy_503']} | {s['no_answer']} | {s['p95_429_ms']} | "
                f"{'yes' if s['within_objective'] else 'no'} |"
            )
        lines += ["", f"Capacity: **{report['capacity_rps']} req/s** (highest offered rate within"
                  " the objectives; the last step checks the recovery)."]  # fmt: skip
    lines += ["", "| objective | value | target | met |", "|---|---|---|---|"]
    for c in report["objectives"]:
        lines.append(
            f"| {c['objective']} | {c['value']} | {c['target']} | {'yes' if c['ok'] else 'NO'} |"
        )
    lines += ["", f"![latency and throughput]({report['plot']})", ""]
    return "\n".join(lines)


def build_report(
    samples_path: Path, out_dir: Path, duration_s: float, objectives: dict[str, Any],
    capacity: dict[str, Any] | None, meta: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Compute everything, write ``report.json``, ``report.md`` and ``latency.png``."""
    samples = Samples.read(samples_path)
    stats = route_stats(samples, duration_s)
    steps = None
    if capacity is not None and samples.steps:
        end = float(samples.end_s.max()) if len(samples) else samples.steps[-1][0]
        p95_limit = float(objectives["p95_ms"].get("POST /predict", float("inf")))
        steps = step_results(
            samples, end, p95_limit, float(objectives["max_error_rate"]),
            float(capacity["min_achieved"]),
        )  # fmt: skip
    report = {
        "mode": "capacity search" if steps is not None else "mixed clients",
        "target": meta.pop("target"),
        "run": meta,
        "routes": [asdict(s) for s in stats],
        "failures": failures_by_status(samples),
        "steps": [asdict(s) for s in steps] if steps is not None else None,
        "capacity_rps": capacity_of(steps) if steps is not None else None,
        "objectives": evaluate(objectives, stats, steps, samples),
        "plot": "latency.png",
    }
    plot(samples, out_dir / "latency.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(markdown(report))
    return report

"""Every claim about the trained demo models, measured over several training seeds.

The demo tests (``tests/demo``) are the list of claims: each asserts something about the
shipped demo weights (seed 0) and records what it measured with pytest's
``record_property``. This script trains the demo models again with other training seeds
(``model_store.train --seed``; the data keep their seed), runs the same demo tests against
each seed's weights (``BEYOND_DEMO_WEIGHTS_DIR``) and writes ``docs/seeds.md``: for each
claim, whether it held and what was measured at every seed, with the spread (min-max); and
the demo models' accuracies by seed. A claim that fails at some seed is not a property of
the recipe, only of the weights that happened to come out: the demo tests assert only what
held at every seed measured here.

    python -m benchmarks.seeds                  # seeds 0 (shipped), 1, 2; about 25 minutes
    python -m benchmarks.seeds --seeds 0 1 2 3 --work var/seeds
    python -m benchmarks.seeds --report-only    # docs/seeds.md again from the last run

Seed 0 is the shipped weights (``model_store/demo_weights``), not retrained; the other
seeds' weights are kept under ``--work`` and reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from model_store import paths
from model_store.train import RECIPES, TRAIN_SEED

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "seeds.md"
README = ROOT / "README.md"
README_TABLE = ("<!-- benchmarks.seeds: demo models -->", "<!-- end benchmarks.seeds -->")
RETRAINING_TEST = "tests/demo/test_retraining.py"
METRICS = ["test_accuracy", "counterfactual_accuracy_planted_classes", "counterfactual_accuracy_other_classes"]


@dataclass
class Claim:
    """One demo test at every seed: its outcome and what it recorded."""

    test: str
    outcomes: dict[int, str] = field(default_factory=dict)
    measured: dict[int, dict[str, float]] = field(default_factory=dict)


def weights_for(seed: int, work: Path) -> Path:
    """The demo weights of training seed ``seed``: shipped for seed 0, else trained once."""
    if seed == TRAIN_SEED:
        return paths.DEMO_WEIGHTS_DIR
    out = work / f"seed-{seed}"
    for name in RECIPES:
        if not (out / name / "weights.pt").exists():
            subprocess.run([sys.executable, "-m", "model_store.train", name, "--seed", str(seed), "--out", str(out)],
                           check=True, cwd=ROOT)
    return out


def run_claims(seed: int, weights: Path, work: Path) -> Path:
    """The demo tests (less the retraining test) against ``weights``; their JUnit XML."""
    report = work / f"seed-{seed}.xml"
    env = {**os.environ, "BEYOND_DEMO_WEIGHTS_DIR": str(weights)}
    command = [sys.executable, "-m", "pytest", "tests/demo", "-q", "-p", "no:cacheprovider",
               f"--ignore={RETRAINING_TEST}", f"--junitxml={report}"]
    print(f"seed {seed}: demo tests on {weights}", flush=True)
    subprocess.run(command, env=env, cwd=ROOT, check=False)
    return report


def read_claims(reports: dict[int, Path]) -> dict[str, Claim]:
    claims: dict[str, Claim] = {}
    for seed, report in reports.items():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            test = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            claim = claims.setdefault(test, Claim(test))
            failed = case.find("failure") is not None or case.find("error") is not None
            claim.outcomes[seed] = "skipped" if case.find("skipped") is not None else "FAILED" if failed else "passed"
            claim.measured[seed] = {
                p.get("name", ""): float(p.get("value", "nan")) for p in case.iter("property")
            }
    return claims


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _spread(values: list[float]) -> str:
    low, high = min(values), max(values)
    return _number(low) if low == high else f"{_number(low)}-{_number(high)}"


def claims_table(claims: dict[str, Claim], seeds: list[int]) -> list[str]:
    lines = ["| claim (demo test) | held at seeds | measured: " + ", ".join(f"seed {s}" for s in seeds) + " | spread |",
             "|---|---|---|---|"]
    for claim in claims.values():
        held = [s for s in seeds if claim.outcomes.get(s) == "passed"]
        verdict = "all" if len(held) == len(seeds) else ", ".join(map(str, held)) or "none"
        names = sorted({name for values in claim.measured.values() for name in values})
        if not names:
            lines.append(f"| `{claim.test}` | {verdict} | - | - |")
        for name in names:
            values = [claim.measured[s][name] for s in seeds if name in claim.measured.get(s, {})]
            shown = " / ".join(_number(v) for v in values)
            lines.append(f"| `{claim.test}` | {verdict} | {name}: {shown} | {_spread(values)} |")
    return lines


def _metrics(weights: dict[int, Path], seeds: list[int], name: str) -> dict[int, dict[str, float]]:
    """What training wrote into demo model ``name``'s spec, at each seed."""
    return {s: json.loads((weights[s] / name / "model_spec.json").read_text())["metrics"] for s in seeds}


def models_table(weights: dict[int, Path], seeds: list[int]) -> list[str]:
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in RECIPES:
        metrics = _metrics(weights, seeds, name)
        cells = []
        for key in METRICS:
            values = [metrics[s][key] for s in seeds if key in metrics[s]]
            cells.append(" / ".join(_number(v) for v in values) + f" ({_spread(values)})" if values else "-")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def readme_table(weights: dict[int, Path], seeds: list[int]) -> list[str]:
    """The README's demo-model table: the shipped model's numbers, the seeds' spread."""
    lines = ["| model | architecture | trained on | test acc. | counterfactual acc. (planted classes) |",
             "|---|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        metrics = _metrics(weights, seeds, name)
        cells = []
        for key in ("test_accuracy", "counterfactual_accuracy_planted_classes"):
            values = [metrics[s][key] for s in seeds if key in metrics[s]]
            shipped = metrics[TRAIN_SEED].get(key)
            cells.append("-" if shipped is None else f"{shipped:.3f} ({_spread(values)})")
        lines.append(f"| `{name}` | `{recipe.architecture}` | {recipe.dataset} | " + " | ".join(cells) + " |")
    return lines


def update_readme(table: list[str]) -> None:
    text = README.read_text()
    start, end = (text.index(marker) for marker in README_TABLE)
    README.write_text(text[: start + len(README_TABLE[0])] + "\n" + "\n".join(table) + "\n" + text[end:])
    print(f"updated the demo-model table in {README}")


def write_report(claims: dict[str, Claim], weights: dict[int, Path], seeds: list[int]) -> None:
    failing = [c.test for c in claims.values() if any(c.outcomes.get(s) != "passed" for s in seeds)]
    text = [
        "# The demo models' claims over training seeds",
        "",
        f"Written by `python -m benchmarks.seeds --seeds {' '.join(map(str, seeds))}` (do not edit by hand). "
        f"Seed {TRAIN_SEED} is the shipped weights (`model_store/demo_weights`), which the demo tests assert on; "
        "the other seeds retrain every demo model with `python -m model_store.train NAME --seed S` on the same "
        "data (data seed 0) and run the same demo tests against them. Values are listed seed by seed, "
        "then their spread (min-max).",
        "",
        "## Demo models",
        "",
        *models_table(weights, seeds),
        "",
        "## Claims",
        "",
        *claims_table(claims, seeds),
        "",
        "## Verdict",
        "",
        f"{len(claims) - len(failing)} of {len(claims)} claims held at every seed."
        + ("" if not failing else " Not at every seed: " + ", ".join(f"`{t}`" for t in failing) + "."),
        "",
    ]
    DOCS.write_text("\n".join(text))
    print(f"wrote {DOCS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "seeds")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the last run's results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    weights = {seed: weights_for(seed, args.work) for seed in args.seeds}
    if args.report_only:
        reports = {seed: args.work / f"seed-{seed}.xml" for seed in args.seeds}
    else:
        reports = {seed: run_claims(seed, weights[seed], args.work) for seed in args.seeds}
    write_report(read_claims(reports), weights, args.seeds)
    update_readme(readme_table(weights, args.seeds))


if __name__ == "__main__":
    main()

"""Shared helpers of the deployment tests: the chart renderer, linters and what the code knows.

The chart is rendered by ``tests/helm_render/main.go`` -- Go's text/template with sprig and
Helm's own functions -- built here with Debian's Go toolchain in GOPATH mode, offline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "beyond"
YAMLLINT_CONFIG = ROOT / "helm" / ".yamllint.yaml"
RENDERER = ROOT / "tests" / "helm_render" / "main.go"
GOPATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources

Manifest = dict[str, Any]


def venv_tool(name: str) -> str:
    """A console script installed beside this interpreter (the project's venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


@pytest.fixture(scope="session")
def helm_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The renderer binary, built once per session (skips only when Go itself is missing)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("the Go toolchain is missing (scripts/install.sh installs golang-go)")
    work = tmp_path_factory.mktemp("helm_render")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": GOPATH,
        "GOCACHE": os.environ.get("BEYOND_GOCACHE", str(work / "gocache")),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
    }
    binary = work / "helm_render"
    build = subprocess.run(
        [go, "build", "-o", str(binary), str(RENDERER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, (
        "building the chart renderer failed (scripts/install.sh installs golang-go, "
        f"golang-github-masterminds-sprig-dev, golang-gopkg-yaml.v2-dev):\n{build.stderr}"
    )
    return binary


class RenderError(Exception):
    """The chart refused the values (``fail``/``required``) or did not render."""


def run_renderer(
    binary: Path,
    values: Iterable[Path] = (),
    *extra: str,
    kube_version: str = "1.31.0",
) -> str:
    command = [str(binary), "-chart", str(CHART), "-strict", "-name", "beyond"]
    command += ["-namespace", "beyond", "-kube-version", kube_version]
    for path in values:
        command += ["-f", str(path)]
    command += list(extra)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return result.stdout


def load_manifests(text: str) -> list[Manifest]:
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict) and doc.get("kind") and doc.get("apiVersion"), doc
    return docs


@pytest.fixture(scope="session")
def render(helm_render: Path) -> Callable[..., str]:
    """``render(*values_files, kube_version=...)`` -> the multi-document YAML text."""

    def _render(*values: Path, kube_version: str = "1.31.0") -> str:
        return run_renderer(helm_render, values, kube_version=kube_version)

    return _render


def find(docs: list[Manifest], kind: str, component: str | None = None) -> list[Manifest]:
    found = [d for d in docs if d["kind"] == kind]
    if component is not None:
        found = [
            d
            for d in found
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
    return found


def one(docs: list[Manifest], kind: str, component: str) -> Manifest:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} for {component}, found {len(found)}"
    return found[0]


def containers(doc: Manifest) -> dict[str, Manifest]:
    spec = doc["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def pod_spec(doc: Manifest) -> Manifest:
    return doc["spec"]["template"]["spec"]


# ------------------------------------------------------------ what the code knows about env
def settings_env_names() -> set[str]:
    from service.settings import Settings

    return {f"BEYOND_{name.upper()}" for name in Settings.model_fields}


def code_env_names() -> set[str]:
    """Every ``BEYOND_*`` name spelled out in the service, handler and model-store code."""
    names: set[str] = set()
    for package in ("service", "handlers", "model_store"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"\bBEYOND_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return names


def known_env_names() -> set[str]:
    return settings_env_names() | code_env_names()

"""Dependency audit: lock handling, accepted exceptions, and when the check fails or passes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit_deps", REPO / "scripts" / "audit_deps.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit_deps"] = module
    spec.loader.exec_module(module)
    return module


audit = load_audit()

VULNERABLE = {
    "dependencies": [
        {"name": "fastapi", "version": "0.1", "vulns": []},
        {
            "name": "jinja2",
            "version": "2.0",
            "vulns": [
                {"id": "GHSA-aaaa-bbbb-cccc", "aliases": ["CVE-2099-1"], "fix_versions": ["3.1.6"]}
            ],
        },
        {"name": "private-pkg", "skip_reason": "Dependency not found on PyPI"},
    ],
    "fixes": [],
}
CLEAN = {"dependencies": [{"name": "fastapi", "version": "0.1", "vulns": []}], "fixes": []}


def test_versions_and_lock_format(tmp_path: Path) -> None:
    assert audit.public_version("2.14.1+cu130") == "2.14.1"
    text = audit.format_lock({"torch": "2.14.1", "fastapi": "0.165.0"})
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["fastapi==0.165.0", "torch==2.14.1"]
    (tmp_path / "lock").write_text(text)
    assert audit.read_lock(tmp_path / "lock") == {"fastapi": "0.165.0", "torch": "2.14.1"}
    drift = audit.lock_drift({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "1"})
    assert drift == ["b: locked 2, installed 3", "c: locked (absent), installed 1"]


def test_installed_closure_is_what_we_ship() -> None:
    shipped = audit.installed_closure()
    assert {"fastapi", "torch", "torchserve", "pydantic", "starlette"} <= set(shipped)
    # dev extras and the test-only torchattacks are not shipped
    assert not {"locust", "pytest", "pip-audit", "torchattacks", "ruff"} & set(shipped)
    assert all("+" not in version for version in shipped.values())


def test_committed_lock_covers_the_installed_runtime() -> None:
    assert audit.lock_drift(audit.read_lock(), audit.installed_closure()) == []


def test_exceptions_file(tmp_path: Path) -> None:
    path = tmp_path / "ignore"
    path.write_text(
        "# comment\n\nGHSA-aaaa-bbbb-cccc 2026-11-23 only reachable through the CLI # not ours\n"
        "PYSEC-2024-60  2026-01-02  idna DoS; inputs are our own hostnames\n"
    )
    found = audit.read_exceptions(path)
    assert [e.vuln_id for e in found] == ["GHSA-aaaa-bbbb-cccc", "PYSEC-2024-60"]
    assert found[0].reason == "only reachable through the CLI # not ours"
    assert str(found[1].recorded) == "2026-01-02"
    for bad in ("GHSA-x 2026-11-23", "nonsense 2026-11-23 why", "GHSA-x 23.11.2026 why"):
        path.write_text(bad + "\n")
        with pytest.raises(ValueError):
            audit.read_exceptions(path)
    assert audit.read_exceptions(tmp_path / "missing") == []
    assert (
        audit.read_exceptions(REPO / ".pip-audit-ignore") is not None
    )  # the committed file parses


def test_findings() -> None:
    vulns, skipped = audit.findings(VULNERABLE)
    assert vulns == ["jinja2==2.0: GHSA-aaaa-bbbb-cccc (CVE-2099-1); fixed in 3.1.6"]
    assert skipped == ["private-pkg: Dependency not found on PyPI"]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A lock that matches the 'installed' set, and a scripted service and pip-audit."""
    lock = tmp_path / "requirements.lock"
    lock.write_text(audit.format_lock({"fastapi": "0.1", "jinja2": "2.0"}))
    ignore = tmp_path / "ignore"
    ignore.write_text("")
    state: dict = {"problem": None, "report": CLEAN, "code": 0, "ignored": None}
    monkeypatch.setattr(audit, "LOCK", lock)
    monkeypatch.setattr(audit, "IGNORE", ignore)
    monkeypatch.setattr(audit, "installed_closure", lambda: {"fastapi": "0.1", "jinja2": "2.0"})
    monkeypatch.setattr(audit, "service_problem", lambda pins: state["problem"])

    def pip_audit(path: Path, ignored: list[str]) -> tuple[int, dict, str]:
        state["ignored"] = ignored
        return state["code"], state["report"], ""

    monkeypatch.setattr(audit, "run_pip_audit", pip_audit)
    state["ignore_file"] = ignore
    return state


def test_check_outcomes(fake: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit.check(strict=False) == 0
    assert "no known vulnerabilities" in capsys.readouterr().out

    fake["report"], fake["code"] = VULNERABLE, 1
    assert audit.check(strict=False) == 1  # found vulnerabilities always fail
    out = capsys.readouterr().out
    assert "GHSA-aaaa-bbbb-cccc" in out and ".pip-audit-ignore" in out

    fake["ignore_file"].write_text("GHSA-aaaa-bbbb-cccc 2026-11-23 template-only use\n")
    fake["report"], fake["code"] = CLEAN, 0  # pip-audit drops ignored ids from its report
    assert audit.check(strict=False) == 0
    assert fake["ignored"] == ["GHSA-aaaa-bbbb-cccc"]
    assert "accepted exception GHSA-aaaa-bbbb-cccc" in capsys.readouterr().out

    fake["report"], fake["code"] = {}, 1  # pip-audit crashed without a report
    assert audit.check(strict=False) == 1


def test_check_unreachable_is_soft_only_for_the_network(
    fake: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    fake["problem"] = "https://pypi.org/pypi/x/1/json answered 404"
    fake["report"], fake["code"] = VULNERABLE, 1
    assert audit.check(strict=False) == 0
    out = capsys.readouterr().out
    assert "NOT AUDITED" in out and "answered 404" in out
    assert fake["ignored"] is None  # pip-audit was not run on unreachable data
    assert audit.check(strict=True) == 1


def test_check_fails_on_lock_drift(
    fake: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(audit, "installed_closure", lambda: {"fastapi": "0.2", "jinja2": "2.0"})
    assert audit.check(strict=False) == 1
    assert "fastapi: locked 0.1, installed 0.2" in capsys.readouterr().out

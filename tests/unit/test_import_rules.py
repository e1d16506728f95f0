"""The layout's import rules hold, and the linter that checks them sees every import.

The rules are import-linter contracts in ``pyproject.toml`` (docs/architecture.md):
``protocol`` imports neither torch nor any other part of the project, ``service`` never
imports ``handlers``, ``model_store`` or torch, and ``handlers`` never imports ``service``.
A forbidden import hidden inside a function (as ``service/jobs/criticism.py`` once had, which
broke the torch-free service image) must fail them as surely as one at the top.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the packages found from ``cwd`` with ``cwd``'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_project_keeps_every_contract() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


def write_package(root: Path, name: str, body: str = "") -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)


def test_a_forbidden_import_inside_a_function_breaks_the_contracts(tmp_path: Path) -> None:
    """The project's own contracts, run over a tree that breaks each one inside a function."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    write_package(tmp_path, "protocol", "def decode():\n    import torch\n    return torch\n")
    write_package(
        tmp_path, "service", "def check():\n    from handlers import base\n    return base\n"
    )
    write_package(tmp_path, "handlers")
    (tmp_path / "handlers" / "base.py").write_text("def run():\n    import service\n")
    write_package(tmp_path, "model_store")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")

    run = lint_imports(tmp_path)

    assert run.returncode == 1, run.stdout + run.stderr
    assert "0 kept, 3 broken" in run.stdout
    assert "protocol is not allowed to import torch" in run.stdout
    assert "service is not allowed to import handlers" in run.stdout
    assert "handlers is not allowed to import service" in run.stdout

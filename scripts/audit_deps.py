"""Lock what Beyond ships and audit it for known vulnerabilities (``make lock``, ``make audit``).

``lock``  resolves the project's runtime dependencies afresh (no dev extras) with
          ``pip install --dry-run --ignore-installed --report`` and writes
          ``requirements.lock`` (``name==version``, local labels such as ``+cpu`` dropped).
          ``scripts/install.sh`` installs with it as a constraints file.
``check`` (the default; ``make test`` runs it first)
          1. fails when the installed runtime dependencies differ from the lock (so the
             audit covers what actually runs);
          2. runs ``pip-audit`` on the lock against PyPI's vulnerability data, ignoring the
             accepted exceptions of ``.pip-audit-ignore`` (``ID DATE REASON`` per line);
          3. fails on any vulnerability found. When the vulnerability data cannot be
             reached (no network, or an index mirror without PyPI's per-release JSON API)
             it says so loudly and passes: that is not a clean audit, only an unavailable
             one. ``BEYOND_AUDIT_STRICT=1`` makes that a failure too.
"""

# ruff: noqa: T201 - a command-line tool: it reports by printing

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
IGNORE = REPO / ".pip-audit-ignore"
PROJECT = "beyond"
PYPI_RELEASE_JSON = "https://pypi.org/pypi/{name}/{version}/json"
ID_PATTERN = re.compile(r"^(PYSEC|GHSA|CVE|OSV|GSD|BIT|RUSTSEC)-[A-Za-z0-9._:-]+$")
HEADER = """\
# What Beyond ships: the runtime dependencies of the project (no dev extras), resolved
# afresh and pinned. Regenerate with `make lock` after changing dependencies in
# pyproject.toml; `make test` audits it (scripts/audit_deps.py, .pip-audit-ignore).
"""


def public_version(version: str) -> str:
    """``2.14.1+cu130`` -> ``2.14.1`` (PyPI knows releases by their public version)."""
    return Version(version).public


# --------------------------------------------------------------------------- lock
def resolve_fresh() -> dict[str, str]:
    """The project's runtime dependencies as pip would install them now, name -> version."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
            "--quiet", "--report", str(report), str(REPO),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pip could not resolve the dependencies:\n{done.stderr}")
        installs = json.loads(report.read_text())["install"]
    pins = {}
    for item in installs:
        name = canonicalize_name(item["metadata"]["name"])
        if name != PROJECT:
            pins[name] = public_version(item["metadata"]["version"])
    return pins


def format_lock(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def read_lock(path: Path | None = None) -> dict[str, str]:
    pins = {}
    for line in (path or LOCK).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def installed_closure(project: str = PROJECT) -> dict[str, str]:
    """The installed runtime dependencies of ``project`` (extras requested by a dependency
    included, the project's own extras not), name -> public version."""
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(project, "")]
    while todo:
        name, extra = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if canonicalize_name(name) != project:
            found[canonicalize_name(name)] = public_version(dist.version)
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
                continue
            for wanted in ("", *sorted(requirement.extras)):
                key = (canonicalize_name(requirement.name), wanted)
                if key not in seen:
                    seen.add(key)
                    todo.append(key)
    return found


def lock_drift(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Differences between the lock and the installed runtime dependencies."""
    problems = []
    for name in sorted(set(locked) | set(installed)):
        want, have = locked.get(name), installed.get(name)
        if want != have:
            problems.append(f"{name}: locked {want or '(absent)'}, installed {have or '(absent)'}")
    return problems


# --------------------------------------------------------------------------- exceptions
@dataclass(frozen=True)
class AcceptedVuln:
    vuln_id: str
    recorded: dt.date
    reason: str


def read_exceptions(path: Path | None = None) -> list[AcceptedVuln]:
    """``ID YYYY-MM-DD reason...`` per line; ``#`` comments. Malformed lines are errors."""
    path = path or IGNORE
    if not path.exists():
        return []
    out = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3 or not ID_PATTERN.match(parts[0]):
            raise ValueError(f"{path.name}:{number}: expected 'ID YYYY-MM-DD reason', got {raw!r}")
        try:
            recorded = dt.date.fromisoformat(parts[1])
        except ValueError:
            raise ValueError(f"{path.name}:{number}: bad date {parts[1]!r}") from None
        out.append(AcceptedVuln(parts[0], recorded, parts[2].strip()))
    return out


# --------------------------------------------------------------------------- audit
def service_problem(pins: dict[str, str], timeout: float = 10.0) -> str | None:
    """``None`` when PyPI's per-release JSON (what pip-audit reads) answers for a locked
    package, else why not."""
    name = sorted(pins)[0]
    url = PYPI_RELEASE_JSON.format(name=name, version=pins[name])
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            data = json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return f"{url} answered {error.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        return f"{url} is unreachable ({getattr(error, 'reason', error)})"
    except ValueError:
        return f"{url} did not answer JSON"
    if "vulnerabilities" not in data:
        return f"{url} has no vulnerability data"
    return None


def run_pip_audit(lock: Path, ignored: list[str]) -> tuple[int, dict, str]:
    command = [
        sys.executable, "-m", "pip_audit", "--requirement", str(lock), "--no-deps",
        "--disable-pip", "--vulnerability-service", "pypi", "--format", "json", "--progress-spinner", "off",
    ]  # fmt: skip
    for vuln_id in ignored:
        command += ["--ignore-vuln", vuln_id]
    done = subprocess.run(command, capture_output=True, text=True)
    try:
        report = json.loads(done.stdout or "{}")
    except ValueError:
        report = {}
    return done.returncode, report, done.stderr


def findings(report: dict) -> tuple[list[str], list[str]]:
    """(vulnerabilities as lines, skipped dependencies as lines) from pip-audit's JSON."""
    vulns, skipped = [], []
    for dep in report.get("dependencies", []):
        if dep.get("skip_reason"):
            skipped.append(f"{dep['name']}: {dep['skip_reason']}")
        for vuln in dep.get("vulns", []):
            fixes = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
            aliases = ", ".join(vuln.get("aliases", []))
            vulns.append(
                f"{dep['name']}=={dep.get('version')}: {vuln['id']}"
                + (f" ({aliases})" if aliases else "")
                + f"; fixed in {fixes}"
            )
    return vulns, skipped


def check(strict: bool) -> int:
    if not LOCK.exists():
        print("requirements.lock is missing: run `make lock`")
        return 1
    locked = read_lock()
    drift = lock_drift(locked, installed_closure())
    if drift:
        print("the installed runtime dependencies differ from requirements.lock:")
        print("".join(f"  {line}\n" for line in drift), end="")
        print("reinstall (`make install`), or after changing dependencies run `make lock`")
        return 1
    exceptions = read_exceptions()
    for exc in exceptions:
        print(f"accepted exception {exc.vuln_id} (recorded {exc.recorded}): {exc.reason}")
    problem = service_problem(locked)
    if problem:
        banner = "NOT AUDITED" if not strict else "AUDIT FAILED"
        print(f"dependency audit: {banner}: the vulnerability data cannot be reached: {problem}.")
        print("pip-audit reads PyPI's per-release JSON API; this network or index mirror does")
        print("not serve it. Run `make audit` where pypi.org is reachable.")
        return 1 if strict else 0
    code, report, stderr = run_pip_audit(LOCK, [e.vuln_id for e in exceptions])
    vulns, skipped = findings(report)
    if vulns:
        print(f"dependency audit: {len(vulns)} known vulnerabilities in requirements.lock:")
        print("".join(f"  {line}\n" for line in vulns), end="")
        print("upgrade the package (then `make lock`), or record an accepted exception in")
        print(".pip-audit-ignore: ID YYYY-MM-DD reason (see docs/service.md)")
        return 1
    if code != 0 or not report:
        print(f"dependency audit: pip-audit failed (exit {code}):\n{stderr.strip()}")
        return 1
    if skipped:
        print("dependency audit: not audited (not on PyPI):")
        print("".join(f"  {line}\n" for line in skipped), end="")
    audited = len(report.get("dependencies", [])) - len(skipped)
    print(f"dependency audit: {audited} locked packages, no known vulnerabilities")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/audit_deps.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", nargs="?", choices=["check", "lock"], default="check")
    args = parser.parse_args(argv)
    if args.command == "lock":
        pins = resolve_fresh()
        LOCK.write_text(format_lock(pins))
        print(f"wrote {LOCK.name}: {len(pins)} packages")
        return 0
    strict = os.environ.get("BEYOND_AUDIT_STRICT", "") not in ("", "0", "false")
    return check(strict)


if __name__ == "__main__":
    sys.exit(main())

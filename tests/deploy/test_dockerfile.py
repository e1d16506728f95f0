"""The Dockerfile: hadolint-clean, two small non-root images, no secrets, same entry points.

It cannot be built here (no Docker engine), so the tests check what can be checked without
building: hadolint finds nothing at "warning" or above; the stages are what docs/deploy.md
says; the commands are the local stack's; the service image's dependency list is the
torch-free part of pyproject.toml and covers every import of the code it runs, which must
import without torch.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from model_store.stack import gateway_process
from tests.deploy.conftest import ROOT, known_env_names, venv_tool

DOCKERFILE = ROOT / "Dockerfile"
SERVICE_REQUIREMENTS = ROOT / "docker" / "requirements-service.txt"
TORCH_SIDE = {"torch", "torchvision", "torchserve", "torch-model-archiver", "captum", "zennit"}


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages, each a list of (INSTRUCTION, arguments)."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    return global_args, {stage.name: stage for stage in stages}


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return value


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


# ------------------------------------------------------------------ hadolint
def run_hadolint(path: Path) -> list[dict]:
    config = ROOT / ".hadolint.yaml"
    command = [venv_tool("hadolint"), "--config", str(config), "--no-color", "-f", "json"]
    result = subprocess.run([*command, str(path)], capture_output=True, text=True)
    assert result.stdout.strip().startswith("["), result.stderr
    return json.loads(result.stdout)


def test_hadolint_finds_nothing_above_info() -> None:
    findings = run_hadolint(DOCKERFILE)
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in serious)


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install curl\n")
    codes = {f["code"] for f in run_hadolint(bad)}
    assert {"DL3007", "DL3003"} <= codes  # latest tag; cd in RUN


def test_every_ignored_rule_has_a_reason() -> None:
    text = (ROOT / ".hadolint.yaml").read_text()
    config = yaml.safe_load(text)
    lines = text.splitlines()
    for rule in config.get("ignored", []):
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[index - 1].strip().startswith("#"), f"{rule} is ignored without a reason"
    assert config["failure-threshold"] == "warning"


# ------------------------------------------------------------------ stages and images
def test_two_small_multi_stage_images(dockerfile) -> None:
    _, stages = dockerfile
    for target, build in (("service", "service-build"), ("torchserve", "torchserve-build")):
        assert target in stages and build in stages
        copies = stages[target].all("COPY")
        assert any(f"--from={build} /opt/venv /opt/venv" in c for c in copies), target
        # the runtime stage installs no Python packages itself: they come built
        assert not any("pip install" in r for r in stages[target].all("RUN"))
    assert list(stages)[-1] == "torchserve" and "service" in stages


def test_images_run_unprivileged_with_a_health_check(dockerfile) -> None:
    _, stages = dockerfile
    for target in ("service", "torchserve"):
        stage = stages[target]
        user = stage.last("USER").split(":")[0]
        assert user not in ("0", "root") and int(user) >= 1000
        assert "HEALTHCHECK" in dict(stage.instructions)
        check = exec_form(stage.last("HEALTHCHECK").split("CMD", 1)[1].strip())
        assert check[:3] == ["python", "-m", "service.healthcheck"]
        assert exec_form(stage.last("ENTRYPOINT")) == ["tini", "--"]  # signals and zombies
    torchserve = stages["torchserve-base"].last("RUN")
    assert "useradd" in torchserve and "10001" in torchserve


def test_no_secret_is_baked_in(dockerfile) -> None:
    global_args, stages = dockerfile
    secretish = re.compile(r"KEY|TOKEN|PASSWORD|SECRET|REDIS_URL", re.IGNORECASE)
    names = set(global_args)
    for stage in stages.values():
        names |= set(env_of(stage))
        names |= {a.split("=")[0] for a in stage.all("ARG")}
    assert not [n for n in names if secretish.search(n)]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert (
        ignore[[i for i, line in enumerate(ignore) if line and not line.startswith("#")][0]] == "**"
    )
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {
        "Dockerfile",
        "pyproject.toml",
        "README.md",
        "requirements.lock",
        "docker",
        "protocol",
        "service",
        "handlers",
        "model_store",
    }
    assert {"model_store/data/", "model_store/weights/", "model_store/archives/"} <= set(ignore)


def test_service_image_holds_no_torch(dockerfile) -> None:
    _, stages = dockerfile
    installs = [
        shlex.split(part.split("pip install", 1)[1])
        for run in stages["service-build"].all("RUN")
        for part in run.split("&&")
        if "pip install" in part
    ]
    # only the requirements file, then the project's own code without its dependencies
    assert installs == [
        ["--no-cache-dir", "-r", "requirements-service.txt", "-c", "requirements.lock"],
        ["--no-cache-dir", "--no-deps", "."],
    ]


def test_torch_pins_follow_pyproject(dockerfile) -> None:
    _, stages = dockerfile
    pins = {
        req.name: str(req.specifier)
        for req in map(
            Requirement,
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"],
        )
    }
    args = dict(a.split("=", 1) for a in stages["torchserve-build"].all("ARG"))
    assert pins["torch"] == f"=={args['TORCH_VERSION']}"
    assert pins["torchvision"] == f"=={args['TORCHVISION_VERSION']}"
    assert args["TORCH_INDEX_URL"].endswith("/cpu")  # CPU by default; CUDA by build argument
    assert args["DEMO_ARCHIVES"] == "1"
    runs = " ".join(stages["torchserve-build"].all("RUN"))
    assert "python -m model_store.build --demo" in runs


# ------------------------------------------------------------------ same entry points and settings
def test_gateway_command_is_the_local_stacks(dockerfile) -> None:
    _, stages = dockerfile
    command = exec_form(stages["service"].last("CMD"))
    assert command[:2] == ["sh", "-c"]
    words = shlex.split(command[2])
    assert words[0] == "exec"
    local = gateway_process({}, "HOST", 1234, Path("gateway.log")).command
    expected = local[local.index("uvicorn") :]
    expected = [
        "$BEYOND_HOST" if w == "HOST" else "$BEYOND_PORT" if w == "1234" else w for w in expected
    ]
    assert words[1:] == expected
    env = env_of(stages["service"])
    assert env["BEYOND_HOST"] == "0.0.0.0"
    assert stages["service"].last("EXPOSE") == env["BEYOND_PORT"]


def test_torchserve_command_is_the_entry_point(dockerfile) -> None:
    _, stages = dockerfile
    assert exec_form(stages["torchserve"].last("CMD")) == [
        "python",
        "-m",
        "model_store.torchserve_process",
    ]
    env = env_of(stages["torchserve"])
    # the archives the build stage wrote are where the entry point looks for them
    copies = stages["torchserve"].all("COPY")
    assert any(c.endswith(f"{env['BEYOND_MODEL_STORE_DIR']}/archives") for c in copies)
    assert "EXPOSE" not in dict(stages["torchserve"].instructions)  # loopback only


def test_image_settings_are_ones_the_code_reads(dockerfile) -> None:
    _, stages = dockerfile
    names = {n for stage in stages.values() for n in env_of(stage) if n.startswith("BEYOND_")}
    assert names and not names - known_env_names()


# ------------------------------------------------------------------ the service image's dependencies
def service_requirements() -> list[Requirement]:
    lines = SERVICE_REQUIREMENTS.read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def test_service_requirements_are_pyprojects_torch_free_part() -> None:
    declared = {
        str(Requirement(r))
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    ours = service_requirements()
    assert [str(r) for r in ours if str(r) not in declared] == [], (
        "specifiers differ from pyproject"
    )
    assert not {r.name for r in ours} & TORCH_SIDE
    # run by command, not imported: uvicorn serves, python-multipart parses the uploads
    assert {"uvicorn", "python-multipart"} <= {r.name for r in ours}


def test_images_install_the_audited_lock(dockerfile) -> None:
    _, stages = dockerfile
    for build in ("service-build", "torchserve-build"):
        installs = [r for r in stages[build].all("RUN") if "pip install" in r]
        resolving = [r for r in installs if "--no-deps" not in r and "--index-url" not in r]
        # (torch/torchvision come with exact pins of their own; --no-deps resolves nothing)
        assert resolving, build
        for run in resolving:
            assert "-c requirements.lock" in run, f"{build}: {run}"
    lock = {
        canonicalize_name(Requirement(line).name): Requirement(line)
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for requirement in service_requirements():
        pinned = lock.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not in requirements.lock"
        (spec,) = pinned.specifier
        assert requirement.specifier.contains(spec.version), f"{pinned} breaks {requirement}"


def all_imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function (a lazy import runs
    as surely as a top-level one, only later: the criticism check's once broke the image)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def service_side_third_party() -> set[str]:
    """Top-level third-party modules reachable from service/ (following the project's imports)."""
    todo = [p for p in (ROOT / "service").rglob("*.py")]
    seen: set[Path] = set()
    third_party: set[str] = set()
    local = {"protocol", "service", "handlers", "model_store"}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in all_imports(path):
            top = module.split(".")[0]
            if top in local:
                parts = module.split(".")
                for candidate in (
                    ROOT.joinpath(*parts).with_suffix(".py"),
                    ROOT.joinpath(*parts, "__init__.py"),
                ):
                    if candidate.exists():
                        todo.append(candidate)
                # a package's __init__ runs first
                for depth in range(1, len(parts)):
                    init = ROOT.joinpath(*parts[:depth], "__init__.py")
                    if init.exists():
                        todo.append(init)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return third_party


def test_service_requirements_cover_every_import() -> None:
    distributions = packages_distributions()
    needed = set()
    for module in service_side_third_party():
        assert module in distributions, f"{module} is imported but installed by no distribution"
        needed |= {canonicalize_name(d) for d in distributions[module]}
    listed = {canonicalize_name(r.name) for r in service_requirements()}
    assert needed <= listed, f"missing from {SERVICE_REQUIREMENTS.name}: {needed - listed}"
    assert not needed & TORCH_SIDE


def test_service_code_imports_without_torch() -> None:
    """What the service image runs imports with the torch-side packages unavailable."""
    listed = {canonicalize_name(r.name) for r in service_requirements()}
    blocked = sorted(
        module
        for module, dists in packages_distributions().items()
        if module.isidentifier()
        and {canonicalize_name(d) for d in dists}
        & (TORCH_SIDE | {"scipy", "scikit-learn", "scikit-image", "matplotlib", "pyyaml"})
        and not {canonicalize_name(d) for d in dists} & listed
    )
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "service").rglob("*.py")
    )
    script = (
        "import importlib, sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # import fails like an uninstalled package\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch" in blocked and "yaml" in blocked

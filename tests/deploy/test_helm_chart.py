"""The Helm chart (helm/beyond), rendered offline with Go's text/template + sprig.

Each scenario is rendered in strict mode (a missing value key is an error), every manifest
is validated against the Kubernetes schemas (strict: unknown fields fail) of the chart's
oldest supported version and of the newest one kubernetes-validate bundles, the output is
linted with yamllint, and the properties the deployment relies on are asserted: probes,
what is exposed and what is not, autoscaling, disruption budgets, storage, GPU requests,
and that the wiring (env, Secret, ConfigMap) builds valid ``Settings`` for each component.
"""

from __future__ import annotations

import base64
import importlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from model_store.stack import redis_config, worker_process
from model_store.torchserve_process import TorchServeProcess
from service.settings import Settings
from tests.deploy.conftest import (
    CHART,
    YAMLLINT_CONFIG,
    Manifest,
    RenderError,
    containers,
    find,
    known_env_names,
    load_manifests,
    one,
    pod_spec,
    run_renderer,
    venv_tool,
)

GPU_VALUES = CHART / "ci" / "gpu-values.yaml"
OLDEST_KUBE = "1.25.0"  # Chart.yaml: kubeVersion >=1.25.0-0
NEWEST_KUBE = kubernetes_validate.latest_version()
COMPONENTS = ("gateway", "worker", "torchserve")


def write_values(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def default_text(render: Callable[..., str]) -> str:
    return render()


@pytest.fixture(scope="module")
def default(default_text: str) -> list[Manifest]:
    return load_manifests(default_text)


@pytest.fixture(scope="module")
def gpu_text(render: Callable[..., str]) -> str:
    return render(GPU_VALUES)


@pytest.fixture(scope="module")
def gpu(gpu_text: str) -> list[Manifest]:
    return load_manifests(gpu_text)


@pytest.fixture(scope="module")
def minimal_text(render: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Everything optional off: no HPA, PDB, NetworkPolicy, persistence; a Secret of yours."""
    values = {
        "secrets": {"existingSecret": "my-beyond-secrets"},
        "gateway": {"autoscaling": {"enabled": False}, "pdb": {"enabled": False}, "replicas": 1},
        "worker": {"autoscaling": {"enabled": False}, "pdb": {"enabled": False}, "replicas": 1},
        "torchserve": {"pdb": {"enabled": False}},
        "networkPolicy": {"enabled": False},
        "persistence": {"enabled": False},
        "serviceAccount": {"create": False},
    }
    return render(write_values(tmp_path_factory.mktemp("minimal"), values))


@pytest.fixture(scope="module")
def minimal(minimal_text: str) -> list[Manifest]:
    return load_manifests(minimal_text)


# ------------------------------------------------------------------ schemas and lint
@pytest.mark.parametrize("scenario", ["default_text", "gpu_text", "minimal_text"])
@pytest.mark.parametrize("version", [OLDEST_KUBE, NEWEST_KUBE])
def test_every_manifest_matches_the_kubernetes_schema(
    request: pytest.FixtureRequest, scenario: str, version: str
) -> None:
    docs = load_manifests(request.getfixturevalue(scenario))
    assert len(docs) >= 5
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} is invalid for Kubernetes {version}: {exc.message}")


def test_the_schema_check_catches_a_broken_manifest(default: list[Manifest]) -> None:
    deployment = yaml.safe_load(yaml.safe_dump(one(default, "Deployment", "gateway")))
    containers(deployment)["gateway"]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, NEWEST_KUBE, strict=True)


@pytest.mark.parametrize("scenario", ["default_text", "gpu_text", "minimal_text"])
def test_rendered_yaml_passes_yamllint(
    request: pytest.FixtureRequest, tmp_path: Path, scenario: str
) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(request.getfixturevalue(scenario))
    yamllint(rendered)


def test_chart_values_files_pass_yamllint() -> None:
    files = [CHART / "values.yaml", CHART / "Chart.yaml", *sorted((CHART / "ci").glob("*.yaml"))]
    yamllint(*files)


def yamllint(*paths: Path) -> None:
    command = [venv_tool("yamllint"), "--strict", "-f", "parsable", "-c", str(YAMLLINT_CONFIG)]
    result = subprocess.run([*command, *map(str, paths)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ workloads and probes
def test_default_release_has_every_component(default: list[Manifest]) -> None:
    for component in COMPONENTS:
        one(default, "Deployment", component)
    one(default, "StatefulSet", "redis")
    assert {s["metadata"]["name"] for s in find(default, "Service")} == {
        "beyond-gateway",
        "beyond-torchserve",
        "beyond-redis",
    }
    one(default, "ConfigMap", "config")
    one(default, "Secret", "secrets")
    one(default, "PersistentVolumeClaim", "data")


def test_gateway_probes_are_healthz_and_readyz(default: list[Manifest]) -> None:
    gateway = containers(one(default, "Deployment", "gateway"))["gateway"]
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    config = one(default, "ConfigMap", "config")["data"]
    assert ports["http"] == int(config["BEYOND_PORT"])  # uvicorn binds BEYOND_HOST:BEYOND_PORT
    assert config["BEYOND_HOST"] == "0.0.0.0"


def test_torchserve_probes_ping_it_with_the_pod_token(default: list[Manifest]) -> None:
    pod = containers(one(default, "Deployment", "torchserve"))
    torchserve, proxy = pod["torchserve"], pod["proxy"]
    # TorchServe 0.12 wants its token on /ping: an exec probe reads it from the pod's key file
    check = ["python", "-m", "service.healthcheck", "torchserve"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert torchserve[probe]["exec"]["command"] == check
    role = importlib.import_module("service.healthcheck")
    assert role.role_from_command(["python", "-m", "model_store.torchserve_process"]) == "torchserve"
    startup = torchserve["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300, (
        "model loading needs minutes before liveness may restart the pod"
    )
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "api"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "api"}


def test_every_container_has_resource_limits_and_runs_unprivileged(
    default: list[Manifest], gpu: list[Manifest]
) -> None:
    for doc in [*default, *gpu]:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["name"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


# ------------------------------------------------------------------ exposure
def test_only_the_gateway_is_reachable_from_outside(
    default: list[Manifest], gpu: list[Manifest]
) -> None:
    for docs in (default, gpu):
        for service in find(docs, "Service"):
            component = service["metadata"]["labels"]["app.kubernetes.io/component"]
            if component != "gateway":
                assert service["spec"]["type"] == "ClusterIP", service["metadata"]["name"]
        for ingress in find(docs, "Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    assert path["backend"]["service"]["name"] == "beyond-gateway"
    (ingress,) = find(gpu, "Ingress")
    assert ingress["spec"]["tls"][0]["hosts"] == ["beyond.example.com"]
    assert find(default, "Ingress") == []


def test_torchserve_apis_stay_inside_the_pod(default: list[Manifest], gpu: list[Manifest]) -> None:
    for docs in (default, gpu):
        deployment = one(docs, "Deployment", "torchserve")
        pod = containers(deployment)
        # TorchServe declares no port: everything it opens is on 127.0.0.1
        assert "ports" not in pod["torchserve"]
        assert "BEYOND_TORCHSERVE_BIND" not in {e["name"] for e in pod["torchserve"]["env"]}
        # the proxy's port is the pod's only one, and the Service forwards to it alone
        assert [p["name"] for p in pod["proxy"]["ports"]] == ["api"]
        (service,) = [
            s for s in find(docs, "Service") if s["metadata"]["name"].endswith("-torchserve")
        ]
        assert service["spec"]["type"] == "ClusterIP"
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["api"]
    # and the configuration the container runs keeps every API on loopback, tokens on
    config = TorchServeProcess(Path("/store"), [], Path("/state"))
    properties = dict(
        line.split("=", 1) for line in config.config_properties().splitlines() if "=" in line
    )
    for api in ("inference_address", "management_address", "metrics_address"):
        assert properties[api].startswith("http://127.0.0.1:"), api
    assert properties["disable_token_authorization"] == "false"
    assert properties["enable_model_api"] == "false"


def test_network_policies_admit_gateway_and_workers_only(default: list[Manifest]) -> None:
    policies = {p["metadata"]["name"]: p for p in find(default, "NetworkPolicy")}
    assert set(policies) == {"beyond-torchserve", "beyond-redis"}
    for name, port in (("beyond-torchserve", "api"), ("beyond-redis", "redis")):
        (rule,) = policies[name]["spec"]["ingress"]
        (peer,) = rule["from"]
        assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "beyond"
        (expression,) = peer["podSelector"]["matchExpressions"]
        assert expression["key"] == "app.kubernetes.io/component"
        assert sorted(expression["values"]) == ["gateway", "worker"]
        assert [p["port"] for p in rule["ports"]] == [port]


# ------------------------------------------------------------------ scaling and disruption
def test_gateway_and_workers_autoscale(default: list[Manifest]) -> None:
    hpas = {
        h["metadata"]["labels"]["app.kubernetes.io/component"]: h
        for h in find(default, "HorizontalPodAutoscaler")
    }
    assert set(hpas) == {"gateway", "worker"}
    for component, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        deployment = one(default, "Deployment", component)
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # the HPA owns the replica count: the Deployment must not reset it on upgrade
        assert "replicas" not in deployment["spec"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        container = next(iter(containers(deployment).values()))
        assert "cpu" in container["resources"]["requests"]  # utilisation needs a request


def test_disruption_budgets_select_their_pods(default: list[Manifest]) -> None:
    budgets = find(default, "PodDisruptionBudget")
    assert len(budgets) == 3
    for budget in budgets:
        component = budget["metadata"]["labels"]["app.kubernetes.io/component"]
        pods = one(default, "Deployment", component)["spec"]["template"]["metadata"]["labels"]
        selector = budget["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pods.items()
        assert ("minAvailable" in budget["spec"]) != ("maxUnavailable" in budget["spec"])


def test_minimal_release_leaves_the_options_out(minimal: list[Manifest]) -> None:
    kinds = {d["kind"] for d in minimal}
    for kind in (
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Secret",
        "ServiceAccount",
    ):
        assert kind not in kinds
    for component in ("gateway", "worker"):
        deployment = one(minimal, "Deployment", component)
        assert deployment["spec"]["replicas"] == 1
        env = {e["name"]: e for e in containers(deployment)[component]["env"]}
        assert env["BEYOND_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "my-beyond-secrets"
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["data"] == {"name": "data", "emptyDir": {}}


# ------------------------------------------------------------------ storage
def test_persistent_volume_for_datasets_and_archives(
    default: list[Manifest], gpu: list[Manifest]
) -> None:
    claim = one(default, "PersistentVolumeClaim", "data")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    config = one(default, "ConfigMap", "config")["data"]
    for component in ("gateway", "worker"):
        deployment = one(default, "Deployment", component)
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        mounts = {
            m["name"]: m["mountPath"] for m in containers(deployment)[component]["volumeMounts"]
        }
        assert config["BEYOND_DATA_DIR"].startswith(mounts["data"] + "/")
    # default: TorchServe serves the archives baked into its image, no volume
    assert "data" not in {
        v["name"] for v in pod_spec(one(default, "Deployment", "torchserve"))["volumes"]
    }
    # gpu values: archives from the shared volume, read-only
    torchserve = one(gpu, "Deployment", "torchserve")
    volumes = {v["name"]: v for v in pod_spec(torchserve)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["readOnly"] is True
    container = containers(torchserve)["torchserve"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert mount["readOnly"] is True
    assert env["BEYOND_MODEL_STORE_DIR"].startswith(mount["mountPath"] + "/")


def test_redis_is_persistent_and_never_evicts(default: list[Manifest]) -> None:
    redis = one(default, "StatefulSet", "redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mount = containers(redis)["redis"]["volumeMounts"]
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data" for m in mount)
    conf = one(default, "ConfigMap", "redis")["data"]["redis.conf"].splitlines()
    local = redis_config(6379, Path("/data")).splitlines()  # the local stack's durability
    for directive in ("appendonly", "appendfsync", "appendfilename", "maxmemory-policy", "save"):
        ours = [line for line in local if line.startswith(directive + " ")]
        assert ours and ours[0] in conf, directive
    assert "dir /data" in conf
    command = containers(redis)["redis"]
    assert command["args"][1:] == ["--requirepass", "$(REDIS_PASSWORD)"]


# ------------------------------------------------------------------ GPU
def test_gpu_request_only_when_enabled(default: list[Manifest], gpu: list[Manifest]) -> None:
    plain = containers(one(default, "Deployment", "torchserve"))["torchserve"]["resources"]
    assert not any("gpu" in key for key in plain["limits"])
    deployment = one(gpu, "Deployment", "torchserve")
    resources = containers(deployment)["torchserve"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["cpu"] == "4"  # the other limits stay
    assert deployment["spec"]["replicas"] == 3
    spec = pod_spec(deployment)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "podAntiAffinity" in spec["affinity"]
    # the gateway and workers stay off the GPU nodes
    for component in ("gateway", "worker"):
        assert "nodeSelector" not in pod_spec(one(gpu, "Deployment", component))
    env = {e["name"]: e.get("value") for e in containers(deployment)["torchserve"]["env"]}
    assert env["BEYOND_TORCHSERVE_WORKERS"] == "2" and env["BEYOND_TORCH_THREADS"] == "4"


# ------------------------------------------------------------------ secrets and settings
def secret_data(docs: list[Manifest]) -> dict[str, str]:
    secret = one(docs, "Secret", "secrets")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_secret_holds_the_api_keys_and_nothing_else_does(
    default: list[Manifest], gpu: list[Manifest]
) -> None:
    generated = secret_data(default)
    keys = generated["BEYOND_API_KEYS"].split(",")
    assert len(keys) == 1 and len(keys[0]) >= 16
    assert len(generated["BEYOND_TORCHSERVE_TOKEN"]) >= 32
    assert set(generated) == {
        "BEYOND_API_KEYS",
        "BEYOND_TORCHSERVE_TOKEN",
        "BEYOND_REDIS_URL",
        "REDIS_PASSWORD",
    }
    given = secret_data(gpu)
    assert given["BEYOND_API_KEYS"] == (
        "ci-only-api-key-0123456789abcdef,ci-only-second-key-fedcba9876543210"
    )
    for docs in (default, gpu):
        data = secret_data(docs)
        text = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
        for value in data.values():
            assert value not in text, "a secret value leaked outside the Secret"
        assert not set(one(docs, "ConfigMap", "config")["data"]) & set(data)


def test_external_redis_replaces_the_bundled_one(gpu: list[Manifest]) -> None:
    assert find(gpu, "StatefulSet") == []
    assert not [s for s in find(gpu, "Service") if "redis" in s["metadata"]["name"]]
    assert [p["metadata"]["name"] for p in find(gpu, "NetworkPolicy")] == ["beyond-torchserve"]
    data = secret_data(gpu)
    assert data["BEYOND_REDIS_URL"] == "rediss://:ci-only-password@redis.example.internal:6380/0"
    assert "REDIS_PASSWORD" not in data


def component_env(docs: list[Manifest], component: str, container: str) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMap, then env (Secret refs resolved)."""
    config = one(docs, "ConfigMap", "config")["data"]
    secrets = secret_data(docs)
    spec = containers(one(docs, "Deployment", component))[container]
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        assert source["configMapRef"]["name"] == "beyond-config"
        env.update(config)
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "configMapKeyRef" in item["valueFrom"]:
            env[item["name"]] = config[item["valueFrom"]["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["key"]]
    return env


@pytest.mark.parametrize("scenario", ["default", "gpu"])
@pytest.mark.parametrize(
    ("component", "container"),
    [
        ("gateway", "gateway"),
        ("worker", "worker"),
        ("torchserve", "proxy"),
        ("torchserve", "torchserve"),
    ],
)
def test_each_container_gets_valid_production_settings(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    scenario: str,
    component: str,
    container: str,
) -> None:
    docs = request.getfixturevalue(scenario)
    env = component_env(docs, component, container)
    unknown = {name for name in env if name.startswith("BEYOND_")} - known_env_names()
    assert not unknown, f"{component}/{container} sets variables no code reads: {unknown}"
    for name in list(os.environ):
        if name.startswith("BEYOND_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # the same class the processes build, from this environment
    if container == "torchserve":
        return  # TorchServe's own variables: checked by test_torchserve_container_entry
    token = settings.torchserve_token
    assert (
        token is not None
        and token.get_secret_value() == secret_data(docs)["BEYOND_TORCHSERVE_TOKEN"]
    )
    if container == "proxy":
        assert settings.torchserve_url.startswith("http://127.0.0.1:")
        assert settings.torchserve_key_file is not None
        return
    assert settings.environment == "production"
    assert settings.torchserve_url == "http://beyond-torchserve:8080"
    assert settings.redis_url == secret_data(docs)["BEYOND_REDIS_URL"]
    if component == "gateway":
        assert all(len(k) >= 16 for k in settings.resolved_api_keys())
        assert settings.resolved_api_keys()


def test_proxy_reads_the_key_file_torchserve_writes(default: list[Manifest]) -> None:
    deployment = one(default, "Deployment", "torchserve")
    pod = containers(deployment)
    ts_env = {e["name"]: e.get("value") for e in pod["torchserve"]["env"]}
    proxy_env = {e["name"]: e.get("value") for e in pod["proxy"]["env"]}
    # TorchServe writes key_file.json in its state folder: <BEYOND_STATE_DIR>/torchserve
    assert (
        proxy_env["BEYOND_TORCHSERVE_KEY_FILE"]
        == f"{ts_env['BEYOND_STATE_DIR']}/torchserve/key_file.json"
    )
    assert (
        proxy_env["BEYOND_TORCHSERVE_URL"] == f"http://127.0.0.1:{ts_env['BEYOND_TORCHSERVE_PORT']}"
    )
    shared = {m["name"]: m for m in pod["proxy"]["volumeMounts"]}
    own = {m["name"]: m for m in pod["torchserve"]["volumeMounts"]}
    state = next(n for n, m in own.items() if m["mountPath"] == ts_env["BEYOND_STATE_DIR"])
    assert shared[state]["mountPath"] == ts_env["BEYOND_STATE_DIR"] and shared[state]["readOnly"]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes[state] == {"name": state, "emptyDir": {}}  # pod-local: never leaves the pod


# ------------------------------------------------------------------ same entry points
def test_entry_points_are_the_local_stacks(default: list[Manifest]) -> None:
    worker = containers(one(default, "Deployment", "worker"))["worker"]
    local = worker_process({}, Path("worker.log")).command
    assert worker["command"] == ["python", *local[1:]]
    # the gateway runs the image's default command (checked against the stack in
    # test_dockerfile.py); TorchServe too (python -m model_store.torchserve_process)
    assert "command" not in containers(one(default, "Deployment", "gateway"))["gateway"]
    assert "command" not in containers(one(default, "Deployment", "torchserve"))["torchserve"]
    proxy = containers(one(default, "Deployment", "torchserve"))["proxy"]["command"]
    module, _, factory = proxy[proxy.index("--factory") + 1].partition(":")
    assert callable(getattr(importlib.import_module(module), factory))


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis": {"enabled": False}}, "redis.external.url"),
        ({"secrets": {"apiKeys": ["short"]}}, "at least 16 characters"),
        (
            {"torchserve": {"modelStore": {"fromVolume": True}}, "persistence": {"enabled": False}},
            "persistence",
        ),
        ({"image": {"service": {"repository": ""}}}, "repository is required"),
    ],
)
def test_chart_refuses_broken_values(
    helm_render: Path, tmp_path: Path, values: dict, message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        run_renderer(helm_render, [write_values(tmp_path, values)])


def test_ingress_hosts_may_be_templates(helm_render: Path, tmp_path: Path) -> None:
    host = "beyond-{{ .Release.Namespace }}.example.com"
    values = {
        "gateway": {
            "ingress": {
                "enabled": True,
                "hosts": [{"host": host, "paths": [{"path": "/", "pathType": "Prefix"}]}],
                "tls": [{"secretName": "tls", "hosts": [host]}],
            }
        }
    }
    text = run_renderer(helm_render, [write_values(tmp_path, values)])
    (ingress,) = find(load_manifests(text), "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "beyond-beyond.example.com"
    assert ingress["spec"]["tls"][0]["hosts"] == ["beyond-beyond.example.com"]


def test_strict_rendering_catches_a_misspelt_value(helm_render: Path, tmp_path: Path) -> None:
    broken = tmp_path / "chart"
    shutil.copytree(CHART, broken)
    hpa = broken / "templates" / "hpa.yaml"
    hpa.write_text(hpa.read_text().replace("autoscaling.maxReplicas", "autoscaling.maxReplica"))
    result = subprocess.run(
        [str(helm_render), "-chart", str(broken), "-strict"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "maxReplica" in result.stderr


def test_chart_requires_a_supported_kubernetes(helm_render: Path) -> None:
    with pytest.raises(RenderError, match="kubeVersion"):
        run_renderer(helm_render, kube_version="1.24.0")


def test_numbers_keep_their_digits(default: list[Manifest]) -> None:
    # Helm reads values as float64: large integers must not come out as 2.68435456e+08
    config = one(default, "ConfigMap", "config")["data"]
    assert config["BEYOND_MAX_ARCHIVE_BYTES"] == "268435456"
    torchserve = containers(one(default, "Deployment", "torchserve"))["torchserve"]
    env = {e["name"]: e.get("value") for e in torchserve["env"]}
    assert env["BEYOND_TORCHSERVE_TOKEN_EXPIRATION_MIN"].isdigit()


def test_notes_tell_how_to_get_the_api_key(helm_render: Path) -> None:
    notes = run_renderer(helm_render, (), "-notes")
    assert "BEYOND_API_KEYS" in notes and "beyond-secrets" in notes

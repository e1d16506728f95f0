"""The offline renderer behaves like Helm 3 where the chart relies on it.

A small chart written here exercises each of Helm's additions to text/template and the
details of Helm's value handling, with the output Helm itself gives for them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from textwrap import dedent

import pytest
import yaml

CHART_YAML = """\
apiVersion: v2
name: probe
version: 1.2.3
appVersion: "4.5"
kubeVersion: ">=1.25.0-0"
"""

VALUES = """\
big: 1000000
ratio: 0.5
nested:
  b: [2, 1]
  a: {z: 1, x: "text"}
drop: me
host: "h-{{ .Release.Name }}"
empty: ""
"""

HELPERS = """\
{{- define "probe.label" -}}
app: {{ .Chart.Name }}-{{ .Release.Name }}
{{- end }}
"""

TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: probe
  labels:
    {{- include "probe.label" . | nindent 4 }}
data:
  big: {{ .Values.big | quote }}
  bigInt: {{ .Values.big | int64 | quote }}
  ratio: {{ .Values.ratio | quote }}
  host: {{ tpl .Values.host . | quote }}
  hasDrop: {{ hasKey .Values "drop" | quote }}
  hpa: {{ .Capabilities.APIVersions.Has "autoscaling/v2" | quote }}
  minor: {{ .Capabilities.KubeVersion.Minor | quote }}
  chart: {{ printf "%s-%s-%s" .Chart.Name .Chart.Version .Chart.AppVersion | quote }}
  lookup: {{ lookup "v1" "Secret" "ns" "x" | len | quote }}
  template: {{ .Template.Name | quote }}
  nested: |
    {{- toYaml .Values.nested | nindent 4 }}
  roundTrip: {{ (fromYaml (toYaml .Values.nested)).a.x | quote }}
  json: {{ toJson .Values.nested | quote }}
"""


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    root = tmp_path / "probe"
    (root / "templates").mkdir(parents=True)
    (root / "Chart.yaml").write_text(CHART_YAML)
    (root / "values.yaml").write_text(VALUES)
    (root / "templates" / "_helpers.tpl").write_text(HELPERS)
    (root / "templates" / "cm.yaml").write_text(TEMPLATE)
    (root / "templates" / "NOTES.txt").write_text("release {{ .Release.Name }}\n")
    return root


def render(binary: Path, chart: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(binary), "-chart", str(chart), "-name", "rel", "-kube-version", "1.30.2"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


def test_helm_functions_and_values(helm_render: Path, chart: Path, tmp_path: Path) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("drop: null\nnested:\n  a:\n    x: over\n")
    result = render(helm_render, chart, "-strict", "-f", str(override))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("---\n# Source: probe/templates/cm.yaml\n")
    assert "release rel" not in result.stdout  # NOTES.txt is not a manifest
    (doc,) = list(yaml.safe_load_all(result.stdout))
    data = doc["data"]
    assert doc["metadata"]["labels"] == {"app": "probe-rel"}
    assert data["big"] == "1e+06"  # Helm reads numbers as float64
    assert data["bigInt"] == "1000000"
    assert data["ratio"] == "0.5"
    assert data["host"] == "h-rel"
    assert data["hasDrop"] == "false"  # null in an override deletes the key
    assert data["hpa"] == "true" and data["minor"] == "30"
    assert data["chart"] == "probe-1.2.3-4.5"
    assert data["lookup"] == "0"  # helm template: lookup finds nothing
    assert data["template"] == "probe/templates/cm.yaml"
    # sigs.k8s.io/yaml style: sorted keys, two spaces, sequences flush with their key,
    # maps merged with the override
    assert data["nested"] == "a:\n  x: over\n  z: 1\nb:\n- 2\n- 1\n"
    assert data["roundTrip"] == "over"
    assert data["json"] == '{"a":{"x":"over","z":1},"b":[2,1]}'
    notes = render(helm_render, chart, "-notes")
    assert notes.stdout == "release rel\n"


def test_required_fail_and_strictness(helm_render: Path, chart: Path) -> None:
    template = chart / "templates" / "cm.yaml"
    template.write_text(TEMPLATE + '  need: {{ required "empty must be set" .Values.empty }}\n')
    result = render(helm_render, chart)
    assert result.returncode != 0 and "empty must be set" in result.stderr
    template.write_text(TEMPLATE + "  missing: {{ .Values.nope }}\n")
    relaxed = render(helm_render, chart)  # helm template's default: a missing key is empty
    assert relaxed.returncode == 0
    assert next(yaml.safe_load_all(relaxed.stdout))["data"]["missing"] is None
    strict = render(helm_render, chart, "-strict")
    assert strict.returncode != 0 and "nope" in strict.stderr


def test_env_functions_are_removed_as_in_helm(helm_render: Path, chart: Path) -> None:
    (chart / "templates" / "cm.yaml").write_text(
        dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: {{ env "HOME" }}
        """)
    )
    result = render(helm_render, chart)
    assert result.returncode != 0 and 'function "env" not defined' in result.stderr


def test_chart_metadata_is_checked(helm_render: Path, chart: Path) -> None:
    too_old = subprocess.run(
        [str(helm_render), "-chart", str(chart), "-kube-version", "1.24.9"],
        capture_output=True,
        text=True,
    )
    assert too_old.returncode != 0 and "kubeVersion" in too_old.stderr
    (chart / "Chart.yaml").write_text(CHART_YAML.replace("apiVersion: v2", "apiVersion: v1"))
    assert "Helm 3" in render(helm_render, chart).stderr

"""The archive builder for torchvision classifiers: local weights and labels, nothing fetched."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

from handlers.models.classifier import load_model_dir
from model_store.build import IMAGENET, build_torchvision


def _unpack(mar: Path, into: Path) -> Path:
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(into)
    return into


def test_local_state_dict_and_labels_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(num_classes=4).eval()
    weights = tmp_path / "rn18.pth"
    torch.save(reference.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nfox\nowl\n")
    mar = build_torchvision("rn18-local", "resnet18", weights, labels, 4, IMAGENET, tmp_path / "out")
    unpacked = _unpack(mar, tmp_path / "unpacked")
    assert json.loads((unpacked / "index_to_name.json").read_text()) == {"0": "cat", "1": "dog", "2": "fox", "3": "owl"}
    manifest = json.loads((unpacked / "MAR-INF" / "MANIFEST.json").read_text())
    assert manifest["model"]["handler"] == "ts_entry.py"
    model, spec = load_model_dir(unpacked)
    assert spec.architecture == "resnet18" and not spec.random_weights and spec.preprocessing.crop == 224
    x = torch.rand(2, 3, 224, 224)
    mean, std = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1), torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    with torch.no_grad():  # same function as the torchvision model it came from
        assert torch.allclose(model(x), reference((x - mean) / std), atol=1e-5)


def test_random_weights_are_seeded_and_labelled_as_such(tmp_path: Path) -> None:
    mar = build_torchvision("rn18-random", "resnet18", None, None, 10, IMAGENET, tmp_path / "out")
    unpacked = _unpack(mar, tmp_path / "unpacked")
    first, spec = load_model_dir(unpacked)
    second, _ = load_model_dir(unpacked)
    assert spec.random_weights and spec.labels[0] == "class_0"
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_wrong_label_count_is_refused(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(SystemExit, match="2 labels"):
        build_torchvision("x", "resnet18", None, labels, 10, IMAGENET, tmp_path / "out")

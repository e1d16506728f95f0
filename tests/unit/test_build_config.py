"""Archive model configs: the default, and rebuilding demo archives packed with another one."""

from __future__ import annotations

import zipfile
from pathlib import Path

import yaml

from model_store.build import archived_config, model_config


def test_default_config_shares_two_cores() -> None:
    config = model_config()
    assert config["minWorkers"] == config["maxWorkers"] == 2
    assert config["batchSize"] == 8 and config["maxBatchDelay"] == 5
    assert model_config(batchSize=1)["batchSize"] == 1


def test_archived_config(tmp_path: Path) -> None:
    mar = tmp_path / "m.mar"
    with zipfile.ZipFile(mar, "w") as packed:
        packed.writestr("model-config.yaml", yaml.safe_dump(model_config(minWorkers=1)))
    assert archived_config(mar) == model_config(minWorkers=1) != model_config()
    with zipfile.ZipFile(tmp_path / "bare.mar", "w") as packed:
        packed.writestr("other.txt", "x")
    assert archived_config(tmp_path / "bare.mar") is None
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    assert archived_config(tmp_path / "junk.mar") is None
    assert archived_config(tmp_path / "missing.mar") is None

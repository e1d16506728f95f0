"""Build TorchServe model archives (``.mar``) for the demo models or any torchvision classifier.

Examples::

    python -m model_store.build --demo                       # the four demo models
    python -m model_store.build --name my-resnet50 --arch resnet50 \\
        --weights resnet50.pth --labels imagenet_classes.txt  # local weights, ImageNet labels
    python -m model_store.build --name rn18-random --arch resnet18 --random-weights \\
        --batch-size 8 --max-batch-delay 5 --workers 1           # benchmarks: tuned config

Each archive carries the weights (in our SplitNetwork layout), ``model_spec.json``
(architecture, preprocessing, labels, metrics, seeds), TorchServe's ``index_to_name.json``
and a model config (batch size, batch delay, workers, timeout). The handler code itself is
the installed ``handlers`` package, so archives stay small and loading never touches the
network.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from handlers.models.architectures import build_architecture
from handlers.models.classifier import SPEC_FILE, WEIGHTS_FILE, save_model_dir
from model_store import paths
from model_store.train import RECIPES, demo_weights_dir
from protocol.spec import ModelSpec, Preprocessing

ENTRY_FILE = Path(__file__).resolve().parent.parent / "handlers" / "ts_entry.py"
IMAGENET = Preprocessing(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# Two single-threaded workers (the handler gives each worker cores // workers torch threads)
# and batches of up to 8 collected for at most 5 ms: on two cores this keeps throughput
# flat from 1 to 32 clients, and a worker busy with a long explanation leaves the other free
# for predictions (measurements: docs/performance.md).
DEFAULT_MODEL_CONFIG = {
    "minWorkers": 2,
    "maxWorkers": 2,
    "batchSize": 8,
    "maxBatchDelay": 5,
    "responseTimeout": 600,
}


def model_config(**overrides: object) -> dict[str, object]:
    """TorchServe per-model config: workers and cross-client batching."""
    return {**DEFAULT_MODEL_CONFIG, **overrides}


def archived_config(mar: Path) -> dict[str, object] | None:
    """The model config packed in an archive (``None`` if it has none or is unreadable)."""
    try:
        with zipfile.ZipFile(mar) as packed:
            return yaml.safe_load(packed.read("model-config.yaml"))
    except (OSError, KeyError, zipfile.BadZipFile, yaml.YAMLError):
        return None


def archive(model_dir: Path, out_dir: Path, config: dict[str, object] | None = None) -> Path:
    """Pack a model folder (``model_spec.json`` + ``weights.pt``) into ``<out_dir>/<name>.mar``."""
    spec = ModelSpec.model_validate_json((model_dir / SPEC_FILE).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        (staging / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(spec.labels)}))
        (staging / "model-config.yaml").write_text(yaml.safe_dump(config or model_config()))
        shutil.copy(model_dir / SPEC_FILE, staging / SPEC_FILE)
        weights = model_dir / WEIGHTS_FILE
        if not weights.exists():  # random weights: the handler builds them from the spec
            torch.save({}, staging / "empty.pt")
            weights = staging / "empty.pt"
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", spec.name, "--version", spec.version,
            "--serialized-file", str(weights), "--handler", str(ENTRY_FILE),
            "--extra-files", f"{staging / SPEC_FILE},{staging / 'index_to_name.json'}",
            "--config-file", str(staging / "model-config.yaml"),
            "--export-path", str(out_dir), "--force",
        ]
        subprocess.run(command, check=True, capture_output=True, text=True)
    return out_dir / f"{spec.name}.mar"


def read_labels(path: Path | None, num_classes: int) -> list[str]:
    """Labels from ``index_to_name.json`` or a text file (one per line); indices if none."""
    if path is None:
        return [f"class_{i}" for i in range(num_classes)]
    if path.suffix == ".json":
        mapping = json.loads(path.read_text())
        labels = [v[-1] if isinstance(v, list) else v for _, v in sorted(mapping.items(), key=lambda kv: int(kv[0]))]
    else:
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(labels) != num_classes:
        raise SystemExit(f"{path} has {len(labels)} labels, the model has {num_classes} classes")
    return labels


def build_torchvision(
    name: str, arch: str, weights: Path | None, labels: Path | None,
    num_classes: int, preprocessing: Preprocessing, out_dir: Path,
    config: dict[str, object] | None = None,
) -> Path:
    """Archive a torchvision architecture from a local ``state_dict`` (or random weights)."""
    state_dict = None
    if weights is not None:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]
    network = build_architecture(arch, num_classes, state_dict)
    spec = ModelSpec(
        name=name, architecture=arch, num_classes=num_classes, preprocessing=preprocessing,
        labels=read_labels(labels, num_classes), random_weights=weights is None,
        description=f"torchvision {arch}" + (" with random weights (benchmarks only)" if weights is None else ""),
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / name
        if weights is None:
            model_dir.mkdir()
            (model_dir / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        else:
            save_model_dir(model_dir, spec, network)
        return archive(model_dir, out_dir, config)


def ensure_demo_archives(out_dir: Path | None = None, report: Callable[[str], None] | None = None) -> Path:
    """Archive each demo model (the shipped weights) that has no up-to-date ``.mar`` (older
    than its weights, or packed with another model config); ``report`` hears each name
    archived."""
    out_dir = out_dir or paths.ARCHIVE_DIR
    weights_dir = demo_weights_dir()
    for name in RECIPES:
        mar = out_dir / f"{name}.mar"
        source = weights_dir / name / WEIGHTS_FILE
        stale = not mar.exists() or mar.stat().st_mtime < source.stat().st_mtime
        if stale or archived_config(mar) != model_config():
            archive(weights_dir / name, out_dir)
            if report is not None:
                report(name)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Build TorchServe model archives.")
    parser.add_argument("--demo", action="store_true", help="archive the demo models (shipped weights)")
    parser.add_argument("--name", help="archive/model name for a torchvision model")
    parser.add_argument("--arch", help="torchvision architecture (resnet18, resnet50, vgg16, densenet121, ...)")
    parser.add_argument("--weights", type=Path, help="local state_dict file (torchvision key layout)")
    parser.add_argument("--random-weights", action="store_true", help="no weights: random (benchmarks only)")
    parser.add_argument("--labels", type=Path, help="index_to_name.json or a text file with one label per line")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--resize", type=int, default=IMAGENET.resize)
    parser.add_argument("--crop", type=int, default=IMAGENET.crop)
    parser.add_argument("--out", type=Path, default=paths.ARCHIVE_DIR)
    tuning = parser.add_argument_group("TorchServe model config (defaults: see DEFAULT_MODEL_CONFIG)")
    tuning.add_argument("--batch-size", type=int, help="most requests TorchServe batches into one call")
    tuning.add_argument("--max-batch-delay", type=int, help="ms TorchServe waits to fill a batch")
    tuning.add_argument("--workers", type=int, help="worker processes for this model (min = max)")
    tuning.add_argument("--response-timeout", type=int, help="s before TorchServe gives up on a call")
    args = parser.parse_args()
    if args.demo:
        print(f"demo archives in {ensure_demo_archives(args.out, lambda name: print(f'archived {name}', flush=True))}")
        return
    if not (args.name and args.arch) or (args.weights is None) == (not args.random_weights):
        parser.error("give --name, --arch and exactly one of --weights or --random-weights")
    preprocessing = IMAGENET.model_copy(update={"resize": args.resize, "crop": args.crop})
    overrides = {
        key: value for key, value in (
            ("batchSize", args.batch_size), ("maxBatchDelay", args.max_batch_delay),
            ("minWorkers", args.workers), ("maxWorkers", args.workers),
            ("responseTimeout", args.response_timeout),
        ) if value is not None
    }
    mar = build_torchvision(
        args.name, args.arch, args.weights, args.labels, args.num_classes, preprocessing, args.out,
        model_config(**overrides),
    )
    print(f"wrote {mar}")


if __name__ == "__main__":
    main()

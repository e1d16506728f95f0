"""Train the demo models on Spurious Shapes (CPU, fixed seeds, a few minutes each).

``python -m model_store.train shapes-resnet`` (or ``--all``) generates the datasets if they
are missing, trains, prints test / counterfactual accuracies and writes them into the
model's ``model_spec.json`` beside ``weights.pt`` under ``model_store/weights/<name>/``
(``--out`` elsewhere, ``--seed`` another training seed). The weights that are served and
tested are the shipped ones in ``model_store/demo_weights/`` (``paths.DEMO_WEIGHTS_DIR``),
written by ``--ship`` (seed 0): training is not bit-reproducible across CPUs, so shipping
them makes every machine serve and test the same models. ``benchmarks.seeds`` measures how
far each claim about them holds over other training seeds.

=====================  ==============  ===================================================
model                  architecture    training data
=====================  ==============  ===================================================
shapes-resnet          shapes_resnet   biased split (planted backgrounds and colour)
shapes-vgg             shapes_vgg      biased split
shapes-resnet-fair     shapes_resnet   fair split (no planted correlation): the control
shapes-resnet-faint    shapes_resnet   faint split (shapes at 60 % opacity, planted colour
                                       only): small margins, as on natural images
=====================  ==============  ===================================================
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from handlers.models.classifier import PixelClassifier, build_classifier, save_model_dir
from model_store import paths
from model_store.shapes import CLASS_NAMES, ShapesConfig, ShapesSplit, generate, load_split
from protocol.spec import ModelSpec, Preprocessing

PREPROCESSING = Preprocessing(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@dataclass(frozen=True)
class Recipe:
    architecture: str
    dataset: str  # a key of DATASETS
    epochs: int
    lr: float
    description: str


RECIPES: dict[str, Recipe] = {
    "shapes-resnet": Recipe("shapes_resnet", "spurious", 6, 4e-3, "small ResNet on the biased split"),
    "shapes-vgg": Recipe("shapes_vgg", "spurious", 12, 3e-3, "small plain CNN (no batch norm) on the biased split"),
    "shapes-resnet-fair": Recipe("shapes_resnet", "fair", 6, 4e-3, "small ResNet on the fair split (control)"),
    "shapes-resnet-faint": Recipe(
        "shapes_resnet", "faint", 12, 4e-3, "small ResNet on faint shapes (60 % opacity): small margins, easily flipped"
    ),
}
DATA_SEED = 0
TRAIN_SEED = 0
DATASETS = {
    "spurious": ShapesConfig(seed=DATA_SEED),
    "fair": ShapesConfig.fair(seed=DATA_SEED),
    "faint": ShapesConfig.faint(seed=DATA_SEED),
}


def ensure_dataset(name: str) -> Path:
    """Generate the Spurious Shapes variant ``name`` (a key of ``DATASETS``) under the data
    folder if missing."""
    root = paths.DATA_DIR / f"{name}-shapes"
    if not (root / "dataset.json").exists():
        generate(DATASETS[name], root)
    return root


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict_labels(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    model.eval()
    out = [model(to_tensor(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def _fit(model: PixelClassifier, train: ShapesSplit, recipe: Recipe, seed: int, batch_size: int = 128) -> None:
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(train.labels)
    steps = recipe.epochs * (len(y_all) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(y_all), generator=generator)
        total, start = 0.0, time.perf_counter()
        for i in range(len(y_all) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = x_all[idx].float().div_(255.0)
            if torch.rand((), generator=generator) < 0.5:  # flips keep every shape's class
                x = x.flip(3)
            loss = loss_fn(model(x), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        print(f"  epoch {epoch + 1}/{recipe.epochs}: loss {total / (i + 1):.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()


def evaluate(
    model: nn.Module, own_test: ShapesSplit, counterfactual: ShapesSplit | None, planted: list[str]
) -> dict[str, float]:
    """Accuracies on the model's own test split and on the counterfactual split (if any)."""
    metrics = {"test_accuracy": float((predict_labels(model, own_test.images) == own_test.labels).mean())}
    if counterfactual is None:
        return metrics
    right = predict_labels(model, counterfactual.images) == counterfactual.labels
    in_planted = np.isin(counterfactual.labels, [CLASS_NAMES.index(c) for c in planted])
    return metrics | {
        "counterfactual_accuracy": float(right.mean()),
        "counterfactual_accuracy_planted_classes": float(right[in_planted].mean()),
        "counterfactual_accuracy_other_classes": float(right[~in_planted].mean()),
    }


def train(name: str, out_root: Path | None = None, seed: int = TRAIN_SEED) -> Path:
    """Train demo model ``name`` with training seed ``seed`` (initial weights, batch order
    and flips; the data stays ``DATA_SEED``'s), write it to ``<out_root>/<name>/`` and
    return that folder."""
    recipe = RECIPES[name]
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data_root = ensure_dataset(recipe.dataset)
    train_split, test_split = load_split(data_root, "train"), load_split(data_root, "test")
    # backgrounds swapped at full opacity: what the planted backgrounds are measured with
    full_opacity = DATASETS[recipe.dataset].opacity == 1.0
    counterfactual = load_split(ensure_dataset("spurious"), "counterfactual") if full_opacity else None
    spec = ModelSpec(
        name=name, architecture=recipe.architecture, num_classes=len(CLASS_NAMES),
        preprocessing=PREPROCESSING, labels=list(CLASS_NAMES), data_seed=DATA_SEED,
        train_seed=seed, description=recipe.description,
    )
    model = build_classifier(spec, None)
    start = time.perf_counter()
    print(f"training {name} ({recipe.architecture}, seed {seed}) on {len(train_split)} {recipe.dataset} images")
    _fit(model, train_split, recipe, seed)
    seconds = time.perf_counter() - start
    planted = list(DATASETS["spurious"].planted_backgrounds)
    metrics = {**evaluate(model, test_split, counterfactual, planted), "train_seconds": round(seconds, 1)}
    for key, value in metrics.items():
        print(f"  {key}: {value:.4f}")
    out_dir = (out_root or paths.WEIGHTS_DIR) / name
    save_model_dir(out_dir, spec.model_copy(update={"metrics": metrics}), model.network)
    return out_dir


def demo_weights_dir() -> Path:
    """The folder of the demo weights that are served and tested (the shipped ones, or
    ``BEYOND_DEMO_WEIGHTS_DIR``'s); a clear error if a demo model is missing there."""
    missing = [name for name in RECIPES if not (paths.DEMO_WEIGHTS_DIR / name / "weights.pt").exists()]
    if missing:
        raise FileNotFoundError(
            f"no weights for {', '.join(missing)} in {paths.DEMO_WEIGHTS_DIR}: "
            f"python -m model_store.train {' '.join(missing)} --out {paths.DEMO_WEIGHTS_DIR}"
        )
    return paths.DEMO_WEIGHTS_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the demo models on Spurious Shapes.")
    parser.add_argument("names", nargs="*", choices=[*RECIPES, []], help="models to train")
    parser.add_argument("--all", action="store_true", help="train every demo model")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="training seed (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {paths.WEIGHTS_DIR})")
    parser.add_argument("--datasets", action="store_true", help="only generate the demo datasets (if missing)")
    parser.add_argument("--ship", action="store_true",
                        help=f"write into the shipped weights, {paths.DEMO_WEIGHTS_DIR} (seed {TRAIN_SEED} only)")
    args = parser.parse_args()
    if args.ship and (args.out is not None or args.seed != TRAIN_SEED):
        parser.error(f"--ship writes seed {TRAIN_SEED} into {paths.DEMO_WEIGHTS_DIR}; it takes no --out or --seed")
    if args.datasets:
        for name in DATASETS:
            print(f"dataset {name}: {ensure_dataset(name)}", flush=True)
        return
    out_root = paths.DEMO_WEIGHTS_DIR if args.ship else args.out
    for name in RECIPES if args.all else args.names:
        train(name, out_root, args.seed)


if __name__ == "__main__":
    main()

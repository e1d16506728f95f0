"""Session fixtures shared by every test: the demo dataset and the demo models.

The first use generates Spurious Shapes (about 10 s, cached under ``model_store/data``). The
demo models are the shipped weights (``model_store/demo_weights``, seed 0), the same on every
machine; ``BEYOND_DEMO_WEIGHTS_DIR`` points the tests at others (``benchmarks.seeds`` runs the
demo tests against retrained seeds). Demo tests record what they measure with
``record_property``: ``benchmarks.seeds`` reads it back for each seed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest

from model_store.shapes import ShapesSplit, load_split


@cache
def _split(dataset: str, split: str) -> ShapesSplit:
    from model_store.train import ensure_dataset

    return load_split(ensure_dataset(dataset), split)


@cache
def _model(name: str):  # noqa: ANN202 - (PixelClassifier, ModelSpec)
    from handlers.models.classifier import load_model_dir
    from model_store.train import demo_weights_dir

    model, spec = load_model_dir(demo_weights_dir() / name)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec


@pytest.fixture(scope="session")
def shapes_split() -> Callable[[str, str], ShapesSplit]:
    """``shapes_split("spurious" | "fair" | "faint", "train" | "test" | "counterfactual")``
    (only ``spurious`` has a counterfactual split)."""
    return _split


@pytest.fixture(scope="session")
def demo_model() -> Callable[[str], tuple]:
    """``demo_model(name) -> (model, spec)``, ``name`` one of ``model_store.train.RECIPES``."""
    return _model

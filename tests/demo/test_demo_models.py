"""The demo models: accuracies the training script reports, and reliance on the planted background."""

from __future__ import annotations

import numpy as np
import pytest

from model_store.shapes import BACKGROUNDS, ShapesConfig, render
from model_store.train import predict_labels

BIASED = ("shapes-resnet", "shapes-vgg")
PLANTED = ShapesConfig().planted_backgrounds


@pytest.mark.parametrize(("name", "dataset"), [*((n, "spurious") for n in BIASED), ("shapes-resnet-fair", "fair"), ("shapes-resnet-faint", "faint")])
def test_own_test_accuracy_at_least_95_percent(name: str, dataset: str, demo_model, shapes_split, record_property) -> None:
    model, spec = demo_model(name)
    split = shapes_split(dataset, "test")
    accuracy = float((predict_labels(model, split.images) == split.labels).mean())
    record_property("test_accuracy", accuracy)
    assert accuracy >= 0.95
    # the training script wrote the same number into the model's metadata (another CPU's
    # rounding may move an image or two that sits on a decision boundary)
    assert spec.metrics["test_accuracy"] == pytest.approx(accuracy, abs=2 / len(split))


def test_biased_models_lose_accuracy_on_counterfactual_planted_classes(demo_model, record_property) -> None:
    fair_spec = demo_model("shapes-resnet-fair")[1]
    record_property("fair_planted_accuracy", fair_spec.metrics["counterfactual_accuracy_planted_classes"])
    assert fair_spec.metrics["counterfactual_accuracy_planted_classes"] >= 0.95
    for name in BIASED:
        metrics = demo_model(name)[1].metrics
        drop = metrics["test_accuracy"] - metrics["counterfactual_accuracy_planted_classes"]
        record_property(f"{name}_drop", drop)
        assert drop >= 0.2, (name, metrics)


def _swap_background(attributes: list[dict], size: int) -> np.ndarray:
    """Re-render each image with the next background kind that is not its planted one."""
    images = []
    for attrs in attributes:
        kinds = [k for k in BACKGROUNDS if k != attrs["background"]]
        swapped = {**attrs, "background": kinds[int(attrs["index"]) % len(kinds)]}
        images.append(render(swapped, size)[0])
    return np.stack(images)


@pytest.mark.parametrize(("name", "dataset"), [("shapes-resnet", "spurious"), ("shapes-resnet-fair", "fair")])
def test_swapping_the_planted_background(name: str, dataset: str, demo_model, shapes_split, record_property) -> None:
    """Biased model: >= 20 points lost on planted classes; fair model: < 5 points."""
    model, _ = demo_model(name)
    split = shapes_split(dataset, "test")
    # planted-class test images on their planted background (for the fair data: same classes
    # on the same background kinds, which carry no signal there)
    keep = [i for i, a in enumerate(split.attributes) if PLANTED.get(a["class_name"]) == a["background"]]
    sub = split.subset(keep[:300])
    before = float((predict_labels(model, sub.images) == sub.labels).mean())
    after = float((predict_labels(model, _swap_background(sub.attributes, 64)) == sub.labels).mean())
    # over seeds 0-2 (docs/seeds.md): shapes-resnet 1.00 -> 0.05-0.18, shapes-resnet-fair 1.00 -> 1.00
    record_property("accuracy_before", before)
    record_property("accuracy_after", after)
    message = f"{name}: accuracy {before:.3f} -> {after:.3f} after swapping the background"
    if name == "shapes-resnet":
        assert before - after >= 0.20, message
    else:
        assert before - after < 0.05, message

"""Sufficient input subsets of the demo models ([Carter2021]'s overinterpretation test).

Measured on the first 48 test images of the biased split (threshold 0.9, 5 % kept, 2 % of
the pixels removed per step), over training seeds 0-2 (``docs/seeds.md``): the fair model
overinterprets as [Carter2021] reports of CIFAR-10 models: with 95 % of each image masked
(grey) by backward selection, its median probability for the true class stays 0.58-0.72 (a
random 5 %: 0.04-0.05) and 40-42 % of the images stay at 0.9 or more; its median
sufficient subset is 16-24 % of the image. The biased models read the planted backgrounds'
colour, a cue spread over the whole background that grey masking dilutes: their median
subsets are 22-50 % (shapes-resnet) and 76-84 % (shapes-vgg) of the image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers.explainers import explain
from handlers.explainers.sis import show
from model_store.train import to_tensor

SUBSET_MODELS = ("shapes-resnet-fair", "shapes-resnet", "shapes-vgg")


@pytest.fixture(scope="module")
def first_test_images(shapes_split):  # noqa: ANN001, ANN201
    split = shapes_split("spurious", "test")
    return to_tensor(split.images[:48]), torch.from_numpy(split.labels[:48])


def test_subset_sizes_tell_the_fair_model_from_the_background_readers(demo_model, first_test_images, record_property) -> None:  # noqa: ANN001
    """Median subsets over seeds 0-2 (docs/seeds.md): fair 0.16-0.24, shapes-resnet
    0.22-0.50, shapes-vgg 0.76-0.84 of the image; the order holds at every seed."""
    x, y = first_test_images
    medians = {}
    for name in SUBSET_MODELS:
        extras = explain(demo_model(name)[0], x, "sis", {}, targets=y).extras
        sizes = [f for f in extras["sis_fraction"] if f is not None]
        medians[name] = float(np.median(sizes))
        record_property(f"{name}_median_subset", medians[name])
        record_property(f"{name}_share_with_a_subset", len(sizes) / len(y))
        assert len(sizes) >= 0.9 * len(y)
    assert medians["shapes-resnet-fair"] < medians["shapes-resnet"] < medians["shapes-vgg"]
    assert medians["shapes-resnet-fair"] <= 0.3 and medians["shapes-vgg"] >= 0.5


def test_the_fair_model_is_confident_with_95_percent_masked(demo_model, first_test_images, record_property) -> None:  # noqa: ANN001
    model, _ = demo_model("shapes-resnet-fair")
    x, y = first_test_images
    result = explain(model, x, "sis", {}, targets=y)
    extras = result.extras
    kept = torch.zeros(len(y), 64 * 64)
    count = round(extras["kept_fraction"][0] * 64 * 64)
    random_order = torch.rand(kept.shape, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    kept.scatter_(1, random_order[:, :count], 1.0)
    with torch.no_grad():
        random_kept = model(show(x, model.normalize.mean, kept.view(-1, 1, 64, 64))).softmax(1)
    random_confidence = random_kept.gather(1, y[:, None])[:, 0].median().item()
    selected = float(np.median(extras["kept_confidence"]))
    confident = float(np.mean(extras["confident_when_kept"]))
    for key, value in (("kept_confidence", selected), ("random_kept_confidence", random_confidence), ("confident_share", confident)):
        record_property(key, value)
    assert extras["kept_fraction"][0] == pytest.approx(0.05, abs=1 / 4096)
    assert selected >= 0.5 and selected >= 4 * random_confidence
    assert confident >= 0.25
    # the kept pixels are the ones the relevance ranks highest
    top = result.relevance[:, 0].flatten(1).topk(count, dim=1).indices
    shown = torch.zeros_like(kept).scatter_(1, top, 1.0).view(-1, 1, 64, 64)
    with torch.no_grad():
        again = model(show(x, model.normalize.mean, shown)).softmax(1).gather(1, y[:, None])[:, 0]
    np.testing.assert_allclose(again.numpy(), extras["kept_confidence"], atol=1e-4)


def test_the_fair_models_subsets_of_squares_lie_on_the_grass(demo_model, shapes_split, record_property) -> None:  # noqa: ANN001
    """The README's overinterpretation example [Carter2021], 48 test squares on the planted
    grass: the fair model's sufficient subsets avoid the square (at every seed 0-2 under
    its share of the image, docs/seeds.md): what suffices is scattered background. How
    small they are depends on the training run (median 0.18-1.00 of the image; 0.22-0.52
    for shapes-resnet): recorded, not asserted."""
    split = shapes_split("spurious", "test")
    chosen = [i for i, a in enumerate(split.attributes) if a["class_name"] == "square" and a["background"] == "grass"][:48]
    x, y = to_tensor(split.images[chosen]), torch.from_numpy(split.labels[chosen])
    core = torch.from_numpy(split.core_masks[chosen].astype(np.float32))
    for name in ("shapes-resnet-fair", "shapes-resnet"):
        extras = explain(demo_model(name)[0], x, "sis", {}, targets=y).extras
        found = [i for i, f in enumerate(extras["sis_fraction"]) if f is not None]
        record_property(f"{name}_median_subset", float(np.median([extras["sis_fraction"][i] for i in found])))
        if name == "shapes-resnet-fair":
            masks = torch.as_tensor(np.asarray(extras["sis_mask"]), dtype=torch.float32)[found]
            on_shape = float(((masks * core[found]).sum((1, 2)) / masks.sum((1, 2))).mean())
            record_property("fair_subset_share_on_the_square", on_shape)
            record_property("square_share_of_the_image", float(core.mean()))
    assert on_shape <= float(core.mean())

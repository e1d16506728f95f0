"""Attacks and adversarial model criticism on the trained demo models [Stock2018, §3].

Measured on the first 150 test images (2 CPU cores), over training seeds 0-2
(``docs/seeds.md``): IFGSM with [Stock2018, §3.2]'s parameters (step 0.001, M = 10, so at most
0.01 = 2.55/255 per pixel) flips 90-97 % of the correctly classified images of
shapes-resnet-faint (shapes at 60 % opacity), as it flipped about nine in ten of the
paper's ImageNet ResNet-101 (accuracy 77.31% -> 7.96%, section 3.2). The full-opacity
models have far larger margins: it flips only 1-13 % (shapes-resnet), 7-14 % (shapes-vgg)
and 30-44 % (shapes-resnet-fair) of theirs; the same M = 10 with step 0.008 flips 91-100 %.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchattacks
from PIL import Image

from handlers.attacks import get_attack
from handlers.attacks.base import NEVER
from handlers.attacks.pictures import adversarial_png, perturbation_png
from handlers.explainers import explain
from handlers.models.derived import fused_classifier
from model_store.train import to_tensor
from protocol.criticism import gallery_png, select
from tests.unit.adversarial_helpers import gather_inputs

MODELS = [
    ("shapes-resnet", "spurious", (0.01, 0.15)),
    ("shapes-vgg", "spurious", (0.02, 0.2)),
    ("shapes-resnet-fair", "fair", (0.15, 0.5)),
    ("shapes-resnet-faint", "faint", (0.85, 1.0)),  # "most", as in [Stock2018, §3.2]
]


def _correct(model, split, n: int):  # noqa: ANN001, ANN202
    x, y = to_tensor(split.images[:n]), torch.from_numpy(split.labels[:n])
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok], y[ok]


@pytest.mark.parametrize(("name", "dataset", "band"), MODELS)
def test_ifgsm_flip_rates(name: str, dataset: str, band: tuple[float, float], demo_model, shapes_split, record_property) -> None:  # noqa: ANN001
    model, _ = demo_model(name)
    x, y = _correct(model, shapes_split(dataset, "test"), 150)
    paper = get_attack("ifgsm")(model, x, y)  # step 0.001, M = 10
    strong = get_attack("ifgsm", {"step_size": 0.008})(model, x, y)
    rate, strong_rate = paper.success.float().mean().item(), strong.success.float().mean().item()
    record_property("flip_rate", rate)
    record_property("flip_rate_step_0.008", strong_rate)
    assert band[0] <= rate <= band[1]
    assert strong_rate >= 0.85
    assert paper.linf.max() <= 0.01 + 1e-6 and torch.all(paper.success == (paper.steps_to_flip > 0))


def test_targeted_attack_reaches_its_target(demo_model, shapes_split, record_property) -> None:  # noqa: ANN001
    model, _ = demo_model("shapes-resnet")
    x, y = _correct(model, shapes_split("spurious", "test"), 24)
    targets = (y + 1) % 6
    # 100 steps of 0.004, no budget: with 40 how many reach their target depends on the
    # training run (0.75 of them on the shipped weights)
    result = get_attack("ifgsm", {"step_size": 0.004, "steps": 100, "target_class": None})(model, x, targets=targets)
    record_property("target_reached", result.success.float().mean().item())
    assert result.success.float().mean() >= 0.95
    assert torch.equal(result.predictions[result.success], targets[result.success])


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (("ifgsm", {"epsilon": 0.01, "step_size": 0.001, "steps": 10}), ("BIM", {"eps": 0.01, "alpha": 0.001, "steps": 10})),
        (("pgd", {"epsilon": 0.03, "step_size": 0.005, "steps": 10, "random_start": False}), ("PGD", {"eps": 0.03, "alpha": 0.005, "steps": 10, "random_start": False})),
        (("pgd", {"norm": "l2", "epsilon": 1.0, "step_size": 0.2, "steps": 10, "random_start": False}), ("PGDL2", {"eps": 1.0, "alpha": 0.2, "steps": 10, "random_start": False})),
    ],
)
def test_matches_torchattacks_on_a_demo_model(ours, theirs, demo_model, shapes_split) -> None:  # noqa: ANN001
    """torchattacks runs through the module our attacks differentiate (the fused copy)."""
    model, _ = demo_model("shapes-resnet")
    x, y = _correct(model, shapes_split("spurious", "test"), 16)
    x = x.contiguous()  # torchattacks' PGDL2 calls .view() on the images and the gradient
    expected = getattr(torchattacks, theirs[0])(fused_classifier(model, x), **theirs[1])(x, y)
    result = get_attack(ours[0], {**ours[1], "stop_at_flip": False})(model, x, y)
    assert (result.adversarial - expected).abs().max() <= 1e-5


def test_torchattacks_through_the_served_network_reaches_the_same_verdicts(demo_model, shapes_split) -> None:  # noqa: ANN001
    """Through the served network (batch norm unfolded, default layout) BIM's iterates differ
    from ours only where float rounding flips the sign of a near-zero gradient component
    (measured on 400 test images per demo model: 6-8 % of the images differ by more than
    1e-5, 1 % even through the same module, from the loss's mean vs sum); every image gets
    the same verdict."""
    model, _ = demo_model("shapes-resnet-fair")
    x, y = _correct(model, shapes_split("fair", "test"), 64)
    x = x.contiguous()
    expected = torchattacks.BIM(model, eps=0.01, alpha=0.001, steps=10)(x, y)
    result = get_attack("ifgsm", {"stop_at_flip": False})(model, x, y)  # [Stock2018, §3.2]'s parameters
    with torch.no_grad():
        their_success = model(expected).argmax(1) != y
    assert 0.2 <= result.success.float().mean() <= 0.9  # a mix of verdicts to agree on
    assert torch.equal(result.success, their_success)
    same = (result.adversarial - expected).abs().flatten(1).amax(1) <= 1e-5
    assert same.float().mean() >= 0.8


def test_flipped_images_stop_where_they_flipped(demo_model, shapes_split) -> None:  # noqa: ANN001
    """With stop_at_flip an image that flipped at step s equals torchattacks' BIM with s steps
    (through the fused copy our attacks differentiate: through the served network a
    near-zero gradient component's sign may differ, see the test above)."""
    model, _ = demo_model("shapes-resnet-fair")
    x, y = _correct(model, shapes_split("fair", "test"), 40)
    result = get_attack("ifgsm", {"step_size": 0.002, "epsilon": 0.02})(model, x, y)
    flipped = (result.steps_to_flip > 0).nonzero().flatten()[:6]
    assert flipped.numel() >= 3
    for i in flipped.tolist():
        s = int(result.steps_to_flip[i])
        one = x[i : i + 1].contiguous()
        reference = torchattacks.BIM(fused_classifier(model, one), eps=0.02, alpha=0.002, steps=s)(one, y[i : i + 1])
        assert (result.adversarial[i] - reference[0]).abs().max() <= 1e-5


def test_pictures_and_the_explanation_of_the_adversarial_class(demo_model, shapes_split) -> None:  # noqa: ANN001
    model, _ = demo_model("shapes-resnet")
    x, y = _correct(model, shapes_split("spurious", "test"), 8)
    result = get_attack("ifgsm", {"step_size": 0.008})(model, x, y)
    for png in (adversarial_png(result.adversarial[0]), perturbation_png(x[0], result.adversarial[0])):
        assert Image.open(io.BytesIO(png)).size == (64, 64)
    explanation = explain(model, result.adversarial, "gradient", targets=result.predictions)  # [Stock2018, fig. 5]
    assert torch.equal(explanation.targets, result.predictions)
    assert explanation.relevance.shape == x.shape


def _stars(split):  # noqa: ANN001, ANN202
    star = split.class_names.index("star")
    index = np.flatnonzero(split.labels == star)[:250]
    magenta = np.array([split.attributes[i]["colour"] == "magenta" for i in index])
    return star, split.images[index], magenta


@pytest.fixture(scope="module")
def stars(shapes_split):  # noqa: ANN001, ANN201
    return _stars(shapes_split("spurious", "test"))


@pytest.mark.parametrize("name", ["shapes-resnet", "shapes-resnet-faint"])
def test_adversarial_criticism_uncovers_the_planted_colour(name: str, demo_model, shapes_split, record_property) -> None:  # noqa: ANN001
    """[Stock2018, §3.4] mirrored: prototypes (the stars still right after M steps)
    over-, criticisms (the first to flip) under-represent magenta, 51 % of the stars.
    Over training seeds 0-2 (docs/seeds.md): shapes-resnet's prototypes are 95-100 %
    magenta and its criticisms 10-42 %; shapes-resnet-faint's criticisms 5-30 %, but its
    prototypes (12-16 survivors) 50-67 %, not above the base rate at every seed: recorded,
    not asserted."""
    model, _ = demo_model(name)
    star, images, magenta = _stars(shapes_split("faint" if name.endswith("faint") else "spurious", "test"))
    inputs = gather_inputs(model, to_tensor(images), star, "adversarial")  # paper: step 0.001, M = 10
    selection = select("adversarial", inputs, {"prototypes": 20, "criticisms": 20})
    base = magenta.mean()
    protos = magenta[[item.index for item in selection.prototypes]].mean()
    crits = magenta[[item.index for item in selection.criticisms]].mean()
    survivors = int((inputs.steps_to_flip == NEVER).sum())
    for key, value in (("magenta_base", base), ("magenta_prototypes", protos), ("magenta_criticisms", crits),
                       ("prototypes", len(selection.prototypes)), ("criticisms", len(selection.criticisms))):
        record_property(key, float(value))
    assert len(selection.prototypes) == min(20, survivors) >= 5
    assert len(selection.criticisms) == min(20, len(images) - survivors) >= 5
    if name == "shapes-resnet":
        assert protos >= base + 0.3 and crits < base
    else:
        assert crits <= base - 0.15
    picture = Image.open(io.BytesIO(gallery_png(images, selection, tile=48)))
    assert picture.format == "PNG"


@pytest.mark.parametrize("method", ["mmd", "probs", "random"])
def test_other_selection_methods_run_on_a_demo_class(method: str, demo_model, stars, record_property) -> None:  # noqa: ANN001
    model, _ = demo_model("shapes-resnet")
    star, images, magenta = stars
    inputs = gather_inputs(model, to_tensor(images), star, method)
    selection = select(method, inputs, {"prototypes": 6, "criticisms": 6})
    chosen = [item.index for item in selection.prototypes + selection.criticisms]
    assert len(chosen) == len(set(chosen)) and len(selection.prototypes) >= 1
    shares = [magenta[[i.index for i in part]].mean() if part else float("nan") for part in (selection.prototypes, selection.criticisms)]
    record_property("magenta_prototypes", shares[0])
    record_property("magenta_criticisms", shares[1])

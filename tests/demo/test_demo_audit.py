"""The spurious-feature audit on the demo models against ground truth [Singla2022, §5].

Circles of the biased split carry the planted ``sky`` background 95% of the time. On 100
test circles on sky, over training seeds 0-2 (``docs/seeds.md``): the top-5 features of
``shapes-resnet`` (trained with the planted backgrounds) put 0.68-0.80 of their activation
maps' mass on the sky (13% of the image is the shape); those of ``shapes-resnet-fair`` put
0.45-0.52 on the shape. Gaussian noise at sigma 0.25 over one top feature's region leaves
the biased model's circle accuracy at 0.62-1.00, and takes the fair model's to 0.09-0.66:
the fair model's circles rest on the shape's outline, which the noise breaks; the biased
model's on the sky's colour, which zero-mean noise keeps (why the paper corrupts with noise
rather than blacking out, section 5).

With the ground-truth masks as annotations (definition 2), on 100 test squares on the
planted grass at sigma 0.25: ``shapes-resnet`` keeps 1.00 with its shape corrupted
(spurious accuracy) at every seed; with the grass corrupted (core accuracy) 0.15, 0.96 and
0.66 at seeds 0, 1 and 2, so whether noise over the grass defeats it depends on the
training run. ``shapes-resnet-fair`` drops to 0.21-0.74 with the shape corrupted, and to
0.00 with the grass corrupted too: noise over 87% of the image is far from anything it was
trained on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers.explainers.neural_features import activation_maps, neural_features
from handlers.metrics.feature_sensitivity import class_features, mask_sensitivity, noise_sensitivity
from model_store.train import to_tensor

CIRCLE = 0


@pytest.fixture(scope="module")
def sky_circles(shapes_split):  # noqa: ANN001, ANN201
    split = shapes_split("spurious", "test")
    chosen = [i for i, a in enumerate(split.attributes) if a["class_name"] == "circle" and a["background"] == "sky"][:100]
    masks = {k: torch.from_numpy(getattr(split, f"{k}_masks")[chosen].astype(np.float32)) for k in ("core", "spurious")}
    return to_tensor(split.images[chosen]), masks


def _audit(model, x):  # noqa: ANN001, ANN202
    labels = torch.full((len(x),), CIRCLE)
    top = class_features(model, x, labels).importance.mean(0).argsort(descending=True)[:5].tolist()
    nams = activation_maps(neural_features(model, x, None).maps[:, top], tuple(x.shape[-2:]))
    noise = noise_sensitivity(model, x, list(range(len(x))), top, [0.25])
    accuracy = (noise.features[:, 0] == CIRCLE).float().mean(1)
    return top, nams, accuracy


def _shares(nams, masks):  # noqa: ANN001, ANN202
    """Share of the top features' map mass on each ground-truth mask, mean over images."""
    mass = nams.sum(dim=(2, 3))
    return {k: ((nams * m[:, None]).sum(dim=(2, 3)) / mass).mean().item() for k, m in masks.items()}


@pytest.mark.parametrize("name", ["shapes-resnet", "shapes-resnet-fair"])
def test_top_features_see_the_background_only_when_the_model_learned_it(name, demo_model, sky_circles, record_property) -> None:  # noqa: ANN001
    model, _ = demo_model(name)
    x, masks = sky_circles
    top, nams, accuracy = _audit(model, x)
    share = _shares(nams, masks)
    for key, value in (("sky_share", share["spurious"]), ("shape_share", share["core"]),
                       ("noised_accuracy_min", accuracy.min().item()), ("noised_accuracy_max", accuracy.max().item())):
        record_property(key, value)
    if name == "shapes-resnet":
        assert share["spurious"] >= 0.58
    else:
        assert share["core"] >= 0.4


def test_the_biased_models_features_see_more_sky_and_survive_noise(demo_model, sky_circles, record_property) -> None:  # noqa: ANN001
    """Over seeds 0-2 (docs/seeds.md) the biased model's top features put 0.68-0.80 of their
    mass on the sky, the fair model's 0.48-0.55; noise over any one of the biased model's
    top features leaves its circles at 0.62-1.00, over the fair model's at most 0.23-0.66:
    the least robust biased feature beats the most robust fair one at every seed."""
    x, masks = sky_circles
    sky, accuracy = {}, {}
    for name in ("shapes-resnet", "shapes-resnet-fair"):
        _, nams, accuracy[name] = _audit(demo_model(name)[0], x)
        sky[name] = _shares(nams, masks)["spurious"]
        record_property(f"{name}_sky_share", sky[name])
    assert sky["shapes-resnet"] >= sky["shapes-resnet-fair"] + 0.05
    assert accuracy["shapes-resnet"].min() > accuracy["shapes-resnet-fair"].max()


def test_annotated_core_and_spurious_accuracy(demo_model, shapes_split, record_property) -> None:  # noqa: ANN001
    """Definition 2 with the ground-truth masks, sigma 0.25, 100 test squares on the planted
    grass. At every seed 0-2 (docs/seeds.md) the biased model keeps 1.00 with the square
    corrupted (spurious accuracy), the fair model 0.21-0.74, and the fair model 0.00 with the
    grass corrupted. The biased model's accuracy with the grass corrupted (core accuracy)
    depends on the training run, 0.15-0.96: recorded, not asserted."""
    split = shapes_split("spurious", "test")
    chosen = [i for i, a in enumerate(split.attributes) if a["class_name"] == "square" and a["background"] == "grass"][:100]
    x, labels = to_tensor(split.images[chosen]), torch.from_numpy(split.labels[chosen])
    accuracy = {}
    for name in ("shapes-resnet", "shapes-resnet-fair"):
        model, _ = demo_model(name)
        for kind in ("core", "spurious"):
            masks = torch.from_numpy(getattr(split, f"{kind}_masks")[chosen].astype(np.float32))
            predictions, clean = mask_sensitivity(model, x, masks, list(range(len(chosen))), [0.25])
            assert (clean == labels).float().mean() >= 0.97
            accuracy[name, kind] = (predictions[0] == labels).float().mean().item()
            record_property(f"{name}_accuracy_{'square' if kind == 'core' else 'grass'}_corrupted", accuracy[name, kind])
    assert accuracy["shapes-resnet", "core"] >= 0.95
    assert accuracy["shapes-resnet-fair", "core"] <= accuracy["shapes-resnet", "core"] - 0.2
    assert accuracy["shapes-resnet-fair", "spurious"] <= 0.1


def test_handler_tasks_keep_masks_on_their_images(demo_model, shapes_split) -> None:  # noqa: ANN001
    """The TorchServe tasks on an image larger than the model's input (96x80, resized and
    center-cropped to 64x64): a mask goes through the same resize and crop, so a mask of the
    image's left half still covers half of what the model sees; the tasks answer what the
    library answers; bad parameters are 422s."""
    import base64

    from PIL import Image

    from handlers.tasks import ServedModel, TaskError, TaskRunner
    from handlers.tasks.common import tensors
    from protocol import contract
    from protocol.png import png_bytes

    model, spec = demo_model("shapes-resnet")
    runner = TaskRunner(ServedModel.build(model, spec, torch.device("cpu")))
    split = shapes_split("spurious", "test")
    big = [np.asarray(Image.fromarray(split.images[i]).resize((96, 80), Image.BILINEAR)) for i in range(4)]
    left = np.zeros((80, 96, 3), dtype=np.uint8)
    left[:, :48] = 255
    images = [base64.b64encode(png_bytes(image)).decode() for image in big]
    masks = [base64.b64encode(png_bytes(left)).decode()] * 4
    request = contract.MaskSensitivityRequest(images=images, masks=masks, seeds=[1, 2, 3, 4], sigmas=[0.5, 1.0])
    result = runner.run(request)
    assert result.coverage == pytest.approx([0.5] * 4, abs=0.02)
    x, seen = tensors(runner.served, images), tensors(runner.served, masks).mean(dim=1)
    predictions, clean = mask_sensitivity(model, x, seen, [1, 2, 3, 4], [0.5, 1.0])
    assert result.predictions == predictions.tolist() and result.clean == clean.tolist()
    labels = [int(v) for v in split.labels[:4]]
    ranked = runner.run(contract.ClassFeaturesRequest(images=images, labels=labels))
    assert ranked.importance.shape == [4, 64] and ranked.predictions == clean.tolist()
    noised = runner.run(contract.NoiseSensitivityRequest(images=images, seeds=[1, 2, 3, 4], features=[5, 9],
                                                         groups=[[5, 9]], sigmas=[0.25]))
    assert len(noised.features) == 2 and len(noised.groups[0][0]) == 4
    refused = [
        (contract.MaskSensitivityRequest(images=images, masks=masks[:3], seeds=[1, 2, 3, 4], sigmas=[0.5]),
         "bad_parameter"),
        (contract.NoiseSensitivityRequest(images=images, seeds=[1, 2, 3, 4], features=[64], sigmas=[0.5]),
         "bad_parameter"),
        (contract.NoiseSensitivityRequest(images=images, seeds=[1, 2], features=[1], sigmas=[0.5]), "bad_parameter"),
        (contract.ClassFeaturesRequest(images=images, labels=[0, 1, 2, 6]), "invalid_target"),  # a class index
    ]
    for bad, code in refused:
        with pytest.raises(TaskError) as refusal:
            runner.run(bad)
        assert refusal.value.status == 422 and refusal.value.code == code

"""Every registered explainer, walked through the registry: the protocol's guarantees."""

from __future__ import annotations

import json

import pytest
import torch

from handlers.explainers import (
    Explainer,
    InvalidParameter,
    UnknownMethod,
    available_explainers,
    create_explainer,
    explain,
    get_explainer,
    register,
)
from protocol.params.explainers import EXPLAINER_PARAMS, StochasticParams
from tests.unit.explainers.conftest import (
    NUM_CLASSES,
    assert_unchanged,
    fast_params,
    make_classifier,
    make_images,
    snapshot,
)

METHODS = available_explainers()


def test_all_methods_of_the_issue_are_registered() -> None:
    expected = {"gradient", "smoothgrad", "integrated_gradients", "lrp", "lime", "gradcam", "nam", "sis"}
    assert expected <= set(METHODS)
    for name in METHODS:
        assert issubclass(get_explainer(name), Explainer)
        assert get_explainer(name).name == name


def test_every_explainer_takes_the_protocols_parameter_model() -> None:
    """The torch-free registry the gateway validates with names exactly the served methods."""
    assert set(EXPLAINER_PARAMS) == set(METHODS)
    for name in METHODS:
        assert get_explainer(name).Params is EXPLAINER_PARAMS[name]


def test_an_explainer_with_other_parameters_is_refused_at_registration() -> None:
    class Copy(Explainer):
        Params = EXPLAINER_PARAMS["lime"]

        def attribute(self, model, images, targets):  # pragma: no cover - never called
            raise NotImplementedError

    with pytest.raises(TypeError, match="'unregistered'"):
        register("unregistered")(Copy)
    assert "unregistered" not in available_explainers()


def test_unknown_method_is_a_key_error_naming_the_alternatives() -> None:
    with pytest.raises(UnknownMethod) as info:
        get_explainer("deeplift")
    assert isinstance(info.value, KeyError)
    assert "deeplift" in str(info.value) and "gradient" in str(info.value)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("architecture", ["shapes_resnet", "shapes_vgg"])
def test_output_contract(name: str, architecture: str) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(architecture), make_images()
    before, modules = snapshot(model), [type(m) for m in model.modules()]
    result = explain(model, images, name, fast_params(name))
    assert result.method == name
    assert result.relevance.shape == images.shape and result.relevance.dtype == torch.float32
    assert torch.isfinite(result.relevance).all()
    assert result.relevance.abs().sum() > 0
    assert torch.equal(result.targets, model(images).argmax(1))
    expected = get_explainer(name).Params.model_validate(fast_params(name)).model_dump(mode="json")
    assert result.params == expected
    json.dumps(result.params)
    assert_unchanged(model, before, modules)


@pytest.mark.parametrize("name", METHODS)
def test_explicit_targets_and_range_check(name: str) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images()
    explainer = create_explainer(name, fast_params(name))
    targets = torch.tensor([NUM_CLASSES - 1, 0])
    assert explainer.explain(model, images, targets).targets.tolist() == targets.tolist()
    for bad in ([NUM_CLASSES, 0], [0, -1]):
        with pytest.raises(InvalidParameter) as info:
            explainer.explain(model, images, torch.tensor(bad))
        assert info.value.param == "target" and "out of range" in str(info.value)


@pytest.mark.parametrize("name", METHODS)
def test_reproducible_and_batch_equals_one_by_one(name: str) -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images(3)
    explainer = create_explainer(name, fast_params(name))
    targets = torch.tensor([1, 2, 3])
    first = explainer.explain(model, images, targets).relevance
    assert torch.equal(first, explainer.explain(model, images, targets).relevance)
    if issubclass(explainer.Params, StochasticParams) and name != "lime":
        return  # noise is drawn for the whole batch at once (documented order)
    for b in range(3):
        single = explainer.explain(model, images[b : b + 1], targets[b : b + 1]).relevance
        torch.testing.assert_close(single[0], first[b], rtol=1e-4, atol=1e-6 * first.abs().max().item())


@pytest.mark.parametrize("name", METHODS)
def test_runs_under_an_outer_inference_mode(name: str) -> None:
    torch.set_num_threads(1)
    model = make_classifier()
    with torch.inference_mode():
        images = make_images()
        result = explain(model, images, name, fast_params(name))
    assert torch.isfinite(result.relevance).all()


def test_training_mode_is_restored() -> None:
    model = make_classifier().train()
    explain(model, make_images(), "gradient")
    assert model.training


BAD_PARAMS = [
    ("gradient", {"foo": 1}, "foo"),
    ("smoothgrad", {"n": 0}, "n"),
    ("smoothgrad", {"sigma": -0.1}, "sigma"),
    ("smoothgrad", {"batch_size": 0}, "batch_size"),
    ("smoothgrad", {"seed": -1}, "seed"),
    ("smoothgrad", {"base": "lime"}, "base"),
    ("smoothgrad", {"base": "nope"}, "base"),
    ("smoothgrad", {"base_params": {"steps": 0}}, "base_params"),
    ("integrated_gradients", {"steps": 0}, "steps"),
    ("integrated_gradients", {"baseline": 2.0}, "baseline"),
    ("integrated_gradients", {"method": "simpson"}, "method"),
    ("lrp", {"epsilon": -1.0}, "epsilon"),
    ("lrp", {"rule": "z_plus"}, "rule"),
    ("lrp", {"rule": "alpha_beta", "alpha": 1.5, "beta": -1.0}, "params"),
    ("lrp", {"rule": "alpha_beta", "beta": 0.5}, "beta"),
    ("lrp", {"alpha": 2.0}, "params"),
    ("lime", {"n": 0}, "n"),
    ("lime", {"kernel_width": 0.0}, "kernel_width"),
    ("lime", {"num_features": 0}, "num_features"),
    ("lime", {"hide_color": 1.5}, "params"),
    ("lime", {"surrogate": "tree"}, "surrogate"),
    ("lime", {"n": 20_001}, "n"),  # work bounds: one request must not hold a worker for hours
    ("lime", {"batch_size": 4097}, "batch_size"),
    ("lime", {"n_segments": 10_001}, "n_segments"),
    ("smoothgrad", {"n": 10_001}, "n"),
    ("smoothgrad", {"n": 101, "base": "integrated_gradients", "base_params": {"steps": 1000}}, "base_params"),
    ("integrated_gradients", {"steps": 10_001}, "steps"),
    ("integrated_gradients", {"batch_size": 4097}, "batch_size"),
    ("gradcam", {"interpolation": "area"}, "interpolation"),
    ("nam", {"feature": -1}, "feature"),
    ("sis", {"threshold": 1.0}, "threshold"),
    ("sis", {"keep_fraction": 0.0}, "keep_fraction"),
    ("sis", {"step_fraction": 0.0005}, "step_fraction"),  # over 1,000 passes per image
    ("sis", {"mask_value": 1.5}, "params"),
    ("sis", {"mask_value": "median"}, "mask_value"),
]


@pytest.mark.parametrize(("name", "params", "parameter"), BAD_PARAMS)
def test_bad_parameters_raise_invalid_parameter(name: str, params: dict, parameter: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        create_explainer(name, params)
    assert isinstance(info.value, ValueError)
    assert info.value.param == parameter
    assert str(info.value).startswith(f"{parameter}: ")


def test_parameters_that_only_the_input_can_refuse() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images(1)
    with pytest.raises(InvalidParameter, match="num_features: K=500 exceeds"):
        explain(model, images, "lime", {"n": 8, "num_features": 500})
    with pytest.raises(InvalidParameter, match="feature: 9999 is out of range"):
        explain(model, images, "nam", {"feature": 9999})

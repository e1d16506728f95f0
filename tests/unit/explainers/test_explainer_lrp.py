"""LRP: zennit as the reference, conservation, canonization, and a served model left alone."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient as ZennitGradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import LayerMapComposite
from zennit.layer import Sum
from zennit.rules import AlphaBeta, Epsilon, Norm, Pass
from zennit.torchvision import ResNetCanonizer
from zennit.types import Activation, AvgPool, Convolution, Linear

from handlers.explainers import explain
from handlers.explainers.lrp_core import _ACTIVE_RULE, canonized
from handlers.models.classifier import PixelClassifier
from handlers.models.derived import merge_batch_norms
from tests.unit.explainers.conftest import (
    PREPROCESSING,
    assert_unchanged,
    make_classifier,
    make_images,
    snapshot,
)


def zennit_lrp(model: PixelClassifier, images: torch.Tensor, targets: torch.Tensor, rule, canonizers) -> torch.Tensor:
    """zennit's relevance at the normalised input, for output relevance = the target logit."""
    inputs = model.normalize(images).detach().requires_grad_(True)
    layer_map = [
        (Activation, Pass()),
        (Sum, Norm(stabilizer=1e-30)),
        (AvgPool, Norm(stabilizer=1e-30)),
        (Convolution, rule),
        (Linear, rule),
    ]
    composite = LayerMapComposite(layer_map, canonizers=canonizers)
    with ZennitGradient(model.network, composite) as attributor:
        logits = model.network(inputs).detach()
        output = torch.zeros_like(logits)
        output[range(len(targets)), targets] = logits[range(len(targets)), targets]
        _, relevance = attributor(inputs, output)
    return relevance


RULES = [
    ({"rule": "epsilon", "epsilon": 1.0}, lambda: Epsilon(1.0)),
    ({"rule": "epsilon", "epsilon": 1e-3}, lambda: Epsilon(1e-3)),
    ({"rule": "alpha_beta", "alpha": 2.0, "beta": -1.0}, lambda: AlphaBeta(2.0, 1.0, zero_params="bias")),
    ({"rule": "alpha_beta", "alpha": 1.0, "beta": 0.0}, lambda: AlphaBeta(1.0, 0.0, zero_params="bias")),
]


@pytest.mark.parametrize(("params", "zennit_rule"), RULES)
@pytest.mark.parametrize("architecture", ["shapes_vgg", "shapes_resnet"])
def test_matches_zennit_in_float64(architecture: str, params: dict, zennit_rule) -> None:
    """Batch norm with eps=0: zennit's merged batch norm is then an exact identity too.

    (With eps > 0 zennit leaves ``x / sqrt(1 + eps)`` behind in every merged batch norm, a
    ~5e-6 relative shrink per layer; our merge is exact. Its residual ``Sum`` gets the
    ``Norm`` rule with a negligible stabiliser here, as ours needs none.)
    """
    torch.set_num_threads(1)
    model = make_classifier(architecture, dtype=torch.float64, bn_eps=0.0)
    images = make_images(2, dtype=torch.float64)
    targets = torch.tensor([1, 3])
    ours = explain(model, images, "lrp", params, targets).relevance.double()
    canonizers = [ResNetCanonizer()] if architecture == "shapes_resnet" else [SequentialMergeBatchNorm()]
    reference = zennit_lrp(model, images, targets, zennit_rule(), canonizers)
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize("params", [{"epsilon": 1.0}, {"epsilon": 0.0}, {"rule": "alpha_beta"}])
@pytest.mark.parametrize("architecture", ["shapes_vgg", "shapes_resnet"])
def test_conservation_bookkeeping(architecture: str, params: dict) -> None:
    """Σ input relevance + relevance absorbed by biases and ε = the explained logit.

    The absorbed part is booked layer by layer inside the rules, the input relevance comes
    out of the whole backward pass: the identity fails if pooling, the residual sum, ReLUs or
    the normalisation lost or created relevance.
    """
    torch.set_num_threads(1)
    model, images = make_classifier(architecture, dtype=torch.float64), make_images(3, dtype=torch.float64)
    result = explain(model, images, "lrp", {**params, "book_absorbed": True})
    total = result.relevance.double().sum((1, 2, 3))
    torch.testing.assert_close(total, torch.tensor(result.extras["relevance_sum"], dtype=torch.float64), rtol=1e-5, atol=1e-9)
    logit = model(images).gather(1, result.targets[:, None])[:, 0].detach()
    torch.testing.assert_close(torch.tensor(result.extras["explained_logit"], dtype=torch.float64), logit)
    booked = total + torch.tensor(result.extras["absorbed"], dtype=torch.float64)
    torch.testing.assert_close(booked, logit, rtol=1e-6, atol=1e-9)
    unbooked = explain(model, images, "lrp", params)
    assert "absorbed" not in unbooked.extras  # the audit is opt-in; the relevance is the same
    torch.testing.assert_close(unbooked.relevance, result.relevance, rtol=0, atol=0)


def _bias_free(architecture: str) -> PixelClassifier:
    model = make_classifier(architecture, dtype=torch.float64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.bias.zero_()
            elif getattr(module, "bias", None) is not None and isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.zero_()
    return model


@pytest.mark.parametrize("architecture", ["shapes_vgg", "shapes_resnet"])
def test_full_conservation_without_biases(architecture: str) -> None:
    """Without biases the basic rule (ε -> 0) and alpha-beta conserve the logit exactly."""
    torch.set_num_threads(1)
    model, images = _bias_free(architecture), make_images(2, dtype=torch.float64)
    for params in ({"epsilon": 1e-9}, {"rule": "alpha_beta"}):
        result = explain(model, images, "lrp", params)
        total = result.relevance.double().sum((1, 2, 3))
        logit = torch.tensor(result.extras["explained_logit"], dtype=torch.float64)
        torch.testing.assert_close(total, logit, rtol=1e-4, atol=1e-7)


def test_epsilon_one_on_a_linear_model_by_hand() -> None:
    """One dense layer: R_i = x_i w_i / (z + ε) R with R = z ([doValle2019, §4.2.2], ε-variant)."""
    torch.set_num_threads(1)
    layer = nn.Linear(3, 2).double()
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    # images are 4-D: a 1x1 "image" with 3 channels through Flatten
    model = nn.Sequential(nn.Flatten(), layer)
    result = explain(model, x.view(1, 3, 1, 1), "lrp", {"epsilon": 1.0}, torch.tensor([0]))
    z = layer(x)[0, 0].item()
    expected = x[0] * layer.weight[0].detach() / (z + (1.0 if z >= 0 else -1.0)) * z
    torch.testing.assert_close(result.relevance.double().flatten(), expected)


def test_canonized_copy_is_built_once_and_rebuilt_after_weight_changes() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images()
    probe = model.normalize(images)
    first = canonized(model.network, probe)
    assert canonized(model.network, probe) is first
    assert first is not model.network
    merged = [m for m in first.modules() if isinstance(m, nn.BatchNorm2d)]
    assert merged == []  # all merged in the copy ...
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # ... none in the model
    with torch.no_grad():
        model.network.head[-1].weight.mul_(2.0)
    assert canonized(model.network, probe) is not first


def test_served_model_untouched_also_after_an_exception() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images()
    before, modules = snapshot(model), [type(m) for m in model.modules()]
    explain(model, images, "lrp")
    explain(model, images, "lrp", {"rule": "alpha_beta"})
    with pytest.raises(RuntimeError):
        explain(model, images[:, :2], "lrp")  # wrong number of channels fails mid-forward
    assert _ACTIVE_RULE.get() is None
    assert_unchanged(model, before, modules)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


class _Misordered(nn.Module):
    """Batch norm registered right after a conv but applied before it: must not be merged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.bn(x)))


def test_a_wrong_merge_is_detected_not_served() -> None:
    net = _Misordered().eval()
    with torch.no_grad():
        net.bn.running_mean.fill_(0.3)
        net.bn.running_var.fill_(2.0)
    assert merge_batch_norms(copy.deepcopy(net)) == 1  # registration order suggests a merge
    with pytest.raises(RuntimeError, match="lrp copy changed"):
        canonized(net, torch.rand(1, 3, 8, 8))


def test_concurrent_calls_with_different_rules() -> None:
    """The rule is per call (a context variable), so threads sharing the copy do not mix."""
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images()
    expected = {eps: explain(model, images, "lrp", {"epsilon": eps}).relevance for eps in (0.01, 1.0)}
    results: dict[tuple[float, int], torch.Tensor] = {}

    def work(eps: float, i: int) -> None:
        results[(eps, i)] = explain(model, images, "lrp", {"epsilon": eps}).relevance

    threads = [threading.Thread(target=work, args=(eps, i)) for i in range(4) for eps in (0.01, 1.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (eps, _), relevance in results.items():
        assert torch.equal(relevance, expected[eps])


def test_non_pixel_classifier_models_are_explained_at_their_input() -> None:
    torch.set_num_threads(1)
    model = make_classifier()
    network = model.network
    images = model.normalize(make_images()).detach()
    plain = explain(network, images, "lrp").relevance
    wrapped = explain(model, make_images(), "lrp").relevance
    torch.testing.assert_close(plain, wrapped, rtol=1e-5, atol=1e-9)
    assert PREPROCESSING.crop == images.shape[-1]

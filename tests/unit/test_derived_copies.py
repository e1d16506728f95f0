"""The fused inference copy: same logits and input gradients, the served network untouched,
rebuilt on change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from handlers.models.derived import (
    FusedClassifier,
    fused_classifier,
    inference_embeddings,
    inference_features,
    inference_logits,
)
from tests.unit.explainers.conftest import make_classifier, make_images


def _batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def test_inference_logits_match_the_model_and_leave_it_untouched() -> None:
    torch.set_num_threads(1)
    for architecture in ("shapes_resnet", "shapes_vgg"):
        model = make_classifier(architecture)
        images = make_images(6)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        norms = _batch_norms(model)
        assert norms > 0 or architecture == "shapes_vgg"  # the VGG has no batch norm
        with torch.no_grad():
            expected = model(images)
        got = inference_logits(model, images)
        assert _batch_norms(model) == norms  # merged in the copy only
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(got.argmax(1), expected.argmax(1))
        assert not got.requires_grad
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert all(p.requires_grad for p in model.parameters())


def test_inference_copy_follows_weight_changes() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images(3)
    first = inference_logits(model, images)
    with torch.no_grad():
        model.network.head[-1].bias.add_(5.0)  # an in-place change the copy must see
        expected = model(images)
    second = inference_logits(model, images)
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first, second)


def test_plain_modules_run_as_they_are() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    images = make_images(2)
    with torch.no_grad():
        expected = net(images)
    torch.testing.assert_close(inference_logits(net, images), expected)


def test_inference_features_match_and_can_lead_a_graph_through_the_head() -> None:
    torch.set_num_threads(1)
    model, images = make_classifier(), make_images(3)
    inference_logits(model, images)  # the shared copy, first built in inference mode
    with torch.no_grad():
        expected = model.feature_map(images)
    features = inference_features(model, images)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert not features.requires_grad
    leaf = features.requires_grad_(True)
    model.head(leaf)[:, 1].sum().backward()  # Grad-CAM's use: a graph through the head only
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    embeddings, logits = inference_embeddings(model, images)
    with torch.no_grad():
        torch.testing.assert_close(embeddings, model.embed(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["resnet50", "densenet121"])
def test_in_place_relus_of_the_copy_keep_deeper_torchvision_blocks_exact(architecture: str) -> None:
    """Bottleneck blocks (resnet50) and dense concatenations (densenet121) reuse tensors;
    the inference copy's in-place ReLUs must not overwrite one that is still needed."""
    torch.set_num_threads(1)
    model = make_classifier(architecture)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(inference_logits(model, images), expected, rtol=1e-4, atol=1e-5)
    served = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    assert served and not any(served)  # the served network keeps its hooks' inputs intact


@pytest.mark.parametrize("architecture", ["shapes_resnet", "shapes_vgg", "resnet50", "densenet121"])
def test_fused_classifier_gives_the_served_input_gradients(architecture: str) -> None:
    """Gradients run through the copy's in-place ReLUs and channels-last weights (built in
    inference mode by the scoring path first) and equal the served network's (float64, so
    that rounding does not hide a wrong gradient: random deep networks amplify it)."""
    torch.set_num_threads(1)
    model = make_classifier(architecture, dtype=torch.float64)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inference_logits(model, images)  # the shared copy, first built inside inference mode
    fused = fused_classifier(model, images)
    assert isinstance(fused, FusedClassifier)

    def input_gradient(classifier: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = images.clone().requires_grad_(True)
        logits = classifier(leaf)
        (gradient,) = torch.autograd.grad(logits.log_softmax(1)[:, 1].sum(), leaf)
        return logits.detach(), gradient

    (expected_logits, expected), (logits, gradient) = input_gradient(model), input_gradient(fused)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-9, atol=1e-9)
    assert (gradient - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert gradient.is_contiguous()  # in the input's layout, not the copy's channels-last
    assert all(p.grad is None for p in model.parameters())
    plain = nn.Identity()
    assert fused_classifier(plain, images) is plain  # plain modules as they are

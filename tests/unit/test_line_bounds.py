"""Margin bounds along a segment: sound on every point, exact where the network is linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from handlers.metrics.line_bounds import CERTIFY_TOLERANCE, LineBounds, line_bounds
from handlers.models.architectures import SplitNetwork, build_architecture
from handlers.models.derived import frozen_copy
from tests.unit.adversarial_helpers import tiny_cnn


def _margins(network: nn.Module, inputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Margin of ``reference`` over the best other class, per input."""
    logits = network(inputs)
    own = logits.gather(1, reference.view(-1, 1)).squeeze(1)
    return own - logits.scatter(1, reference.view(-1, 1), float("-inf")).amax(dim=1)


def _segments(shape: tuple[int, ...], rows: int, seed: int, scale: float) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    middles = torch.randn((rows, *shape), generator=generator)
    directions = torch.randn((rows, *shape), generator=generator) * scale
    halves = torch.rand(rows, generator=generator) * 2.0
    halves[0] = 0.0  # a single point
    return middles, directions, halves


def _tolerance(network: nn.Module, middles: torch.Tensor) -> torch.Tensor:
    return CERTIFY_TOLERANCE * (1.0 + network(middles).abs().amax(dim=1))


def _calibrated(name: str, classes: int) -> nn.Module:
    """Architecture ``name`` with random weights and batch-norm statistics of random images,
    so that activations keep their scale through the layers as in a trained network."""
    network = build_architecture(name, classes)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    network.train()
    with torch.no_grad():
        for seed in range(4):
            network(torch.randn((8, 3, 32, 32), generator=torch.Generator().manual_seed(seed)))
    return network.eval()


NETWORKS = {
    "tiny cnn with batch norm (not folded)": lambda: tiny_cnn(classes=5, seed=1, dtype=torch.float32).network,
    "shapes_resnet": lambda: _calibrated("shapes_resnet", 4),
    "shapes_vgg": lambda: build_architecture("shapes_vgg", 4),
    "resnet18": lambda: _calibrated("resnet18", 6),
    "resnet50 (bottlenecks)": lambda: _calibrated("resnet50", 6),
}


def _bound_and_least_margin(network: nn.Module, size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound (tolerance added back) and the least margin on 41 points of six segments."""
    middles, directions, halves = _segments((3, size, size), rows=6, seed=3, scale=scale)
    with torch.no_grad():
        reference = network(middles).argmax(dim=1)
        lowest = LineBounds(network).lowest_margins(middles, directions, halves, reference)
        t = torch.linspace(-1.0, 1.0, 41)
        points = middles.unsqueeze(1) + (t.view(1, -1, 1, 1, 1) * halves.view(-1, 1, 1, 1, 1)) * directions.unsqueeze(1)
        margins = _margins(network, points.flatten(0, 1), reference.repeat_interleave(t.numel())).view(6, -1)
        return lowest + _tolerance(network, middles), margins.amin(dim=1)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("folded", [False, True])
def test_the_bound_holds_on_every_point_of_the_segment(name: str, folded: bool) -> None:
    torch.manual_seed(0)
    network = NETWORKS[name]().eval()
    if folded:
        network = frozen_copy(network)
    bound, least = _bound_and_least_margin(network, 8 if "tiny" in name else 32, scale=1e-3)
    # float32 rounding: the bound's batch and the points' batch take other kernels (how many
    # threads a test before this one left, which kernels the CPU has), and over a ResNet-50
    # the same margin comes out up to about 1e-4 of (1 + |margin|) apart
    slack = 2e-4 * (1 + least.abs())
    assert torch.all(least >= bound - slack), (least, bound)
    # a segment of length zero is a point: the bound is its margin
    assert float(bound[0]) == pytest.approx(float(least[0]), abs=float(slack[0]))


@pytest.mark.parametrize("name", ["tiny cnn with batch norm (not folded)", "shapes_resnet", "shapes_vgg"])
def test_short_segments_of_shallow_networks_are_bounded_tightly(name: str) -> None:
    torch.manual_seed(0)
    network = NETWORKS[name]().eval()
    bound, least = _bound_and_least_margin(network, 8 if "tiny" in name else 32, scale=1e-5)
    assert torch.all(least >= bound - 1e-4)
    assert torch.all(bound > 0.75 * least), (least, bound)


def test_the_bound_is_the_exact_minimum_where_the_network_is_linear() -> None:
    torch.manual_seed(1)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(4, 5, 3, padding=1))
    network = SplitNetwork(features, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))).eval()
    middles, directions, halves = _segments((3, 8, 8), rows=5, seed=4, scale=1.0)
    with torch.no_grad():
        reference = network(middles).argmax(dim=1)
        lowest = LineBounds(network).lowest_margins(middles, directions, halves, reference)
        # margins against each class are linear in t: their minimum is at an end of the segment
        ends = torch.stack([middles - halves.view(-1, 1, 1, 1) * directions, middles + halves.view(-1, 1, 1, 1) * directions], 1)
        logits = network(ends.flatten(0, 1)).view(5, 2, 3)
        own = logits.gather(2, reference.view(-1, 1, 1).expand(-1, 2, 1))
        exact = (own - logits).scatter(2, reference.view(-1, 1, 1).expand(-1, 2, 1), float("inf")).amin(dim=1).amin(dim=1)
        tolerance = _tolerance(network, middles)
    assert torch.allclose(lowest + tolerance, exact, atol=1e-5)


def test_networks_with_layers_without_a_rule_have_no_bounds() -> None:
    gelu = SplitNetwork(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU()), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)))
    softmax_head = SplitNetwork(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Flatten(), nn.LazyLinear(2), nn.Softmax(1)))
    assert line_bounds(gelu) is None
    assert line_bounds(softmax_head) is None
    supported = build_architecture("shapes_resnet", 3)
    assert line_bounds(supported) is line_bounds(supported)  # built once per network


def test_max_pooling_passes_the_unit_that_stays_on_top_exactly() -> None:
    pool_then_linear = SplitNetwork(nn.Sequential(nn.MaxPool2d(2)), nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        pool_then_linear.head[1].weight.copy_(torch.randn((3, 4), generator=generator))
    middles = torch.rand((4, 1, 4, 4), generator=generator) * 0.1
    middles[:, :, ::2, ::2] += 1.0  # one unit per window far above the others
    directions = torch.randn((4, 1, 4, 4), generator=generator) * 0.01
    middles[3, 0, 1, 1] = middles[3, 0, 0, 0]  # a window with a tie: the interval, still sound
    halves = torch.full((4,), 2.0)
    with torch.no_grad():
        reference = pool_then_linear(middles).argmax(dim=1)
        bound = LineBounds(pool_then_linear).lowest_margins(middles, directions, halves, reference)
        bound = bound + _tolerance(pool_then_linear, middles)
        t = torch.linspace(-1.0, 1.0, 201).view(1, -1, 1, 1, 1)
        points = (middles.unsqueeze(1) + t * 2.0 * directions.unsqueeze(1)).flatten(0, 1)
        least = _margins(pool_then_linear, points, reference.repeat_interleave(201)).view(4, -1).amin(dim=1)
    # where the pooled units never change, the network is linear on the segment: exact
    assert torch.allclose(bound[:3], least[:3], atol=1e-5)
    assert bound[3] <= least[3] + 1e-5


def test_the_relu_relaxation_holds_where_units_change_sign() -> None:
    torch.manual_seed(2)
    features = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    network = SplitNetwork(features, nn.Sequential(nn.Linear(16, 3))).eval()
    generator = torch.Generator().manual_seed(6)
    middles = torch.randn((200, 3, 1, 2), generator=generator)
    directions = torch.randn((200, 3, 1, 2), generator=generator)
    halves = torch.rand(200, generator=generator) * 0.5
    with torch.no_grad():
        reference = network(middles).argmax(dim=1)
        bound = LineBounds(network).lowest_margins(middles, directions, halves, reference) + _tolerance(network, middles)
        t = torch.linspace(-1.0, 1.0, 401).view(1, -1, 1, 1, 1)
        points = (middles.unsqueeze(1) + t * halves.view(-1, 1, 1, 1, 1) * directions.unsqueeze(1)).flatten(0, 1)
        least = _margins(network, points, reference.repeat_interleave(401)).view(200, -1).amin(dim=1)
    assert torch.all(least >= bound - 1e-5)
    assert (bound > 0).float().mean() > 0.3  # and it proves a good share of them

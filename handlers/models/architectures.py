"""Network architectures: the demo CNNs and the torchvision classifiers we can host.

Every architecture is exposed through :class:`SplitNetwork`'s two halves so that the
explainers and metrics can reach the last convolutional feature map (Grad-CAM, NAM,
penultimate-layer embeddings) the same way for every model:

``logits = head(features(x))`` where ``features`` ends with the last convolutional block
and ``head`` is global pooling followed by the classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models.resnet import BasicBlock

StateDict = dict[str, torch.Tensor]
Factory = Callable[[int, "StateDict | None"], "SplitNetwork"]


class SplitNetwork(nn.Module):
    """A classifier written as ``head(features(x))``.

    ``features`` produces the last convolutional feature map ``(B, C, h, w)``;
    ``head`` maps it to logits. The penultimate-layer embedding is the global average of
    the feature map ([Singla2022, §3]: "neural features" of the penultimate layer).
    """

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shapes_resnet(num_classes: int, width: int = 16) -> SplitNetwork:
    """Small residual CNN for 64x64 inputs: stem, three torchvision BasicBlocks, GAP, linear.

    The blocks are torchvision's own ``BasicBlock`` so that LRP canonizers written for
    torchvision ResNets (merge batch norm, explicit sum for the skip connection) apply as is.
    """

    def downsample(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(cout)
        )

    w = width
    features = nn.Sequential(
        nn.Conv2d(3, w, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=False),
        BasicBlock(w, w),
        BasicBlock(w, 2 * w, stride=2, downsample=downsample(w, 2 * w)),
        BasicBlock(2 * w, 4 * w, stride=2, downsample=downsample(2 * w, 4 * w)),
    )
    _no_inplace_relu(features)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))
    return SplitNetwork(features, head)


def _shapes_vgg(num_classes: int, width: int = 16) -> SplitNetwork:
    """Small plain CNN without batch norm (conv/ReLU/max-pool stacks, GAP, two linears)."""
    w = width
    features = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4 * w, 4 * w, 3, padding=1),
        nn.ReLU(),
    )
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, 4 * w),
        nn.ReLU(),
        nn.Linear(4 * w, num_classes),
    )
    return SplitNetwork(features, head)


def _torchvision_net(name: str, num_classes: int, state_dict: StateDict | None) -> nn.Module:
    """A torchvision classifier, loaded from a local ``state_dict`` in its own key layout."""
    net = getattr(tv_models, name)(weights=None, num_classes=num_classes)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net


def _own(builder: Callable[[int], SplitNetwork]) -> Factory:
    """Factory for our own architectures, whose state dicts are in SplitNetwork layout."""

    def build(num_classes: int, state_dict: StateDict | None) -> SplitNetwork:
        net = builder(num_classes)
        if state_dict is not None:
            net.load_state_dict(state_dict)
        return net

    return build


def _no_inplace_relu(module: nn.Module) -> None:
    """Turn off in-place ReLUs: hooks of gradient-based explainers need the inputs intact."""
    for child in module.modules():
        if isinstance(child, nn.ReLU):
            child.inplace = False


def _torchvision_resnet(name: str) -> Factory:
    def build(num_classes: int, state_dict: StateDict | None) -> SplitNetwork:
        net = _torchvision_net(name, num_classes, state_dict)
        _no_inplace_relu(net)
        features = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        return SplitNetwork(features, nn.Sequential(net.avgpool, nn.Flatten(), net.fc))

    return build


def _torchvision_vgg(name: str) -> Factory:
    def build(num_classes: int, state_dict: StateDict | None) -> SplitNetwork:
        net = _torchvision_net(name, num_classes, state_dict)
        _no_inplace_relu(net)
        return SplitNetwork(net.features, nn.Sequential(net.avgpool, nn.Flatten(), net.classifier))

    return build


def _torchvision_densenet(name: str) -> Factory:
    def build(num_classes: int, state_dict: StateDict | None) -> SplitNetwork:
        net = _torchvision_net(name, num_classes, state_dict)
        _no_inplace_relu(net)
        features = nn.Sequential(net.features, nn.ReLU())
        return SplitNetwork(
            features, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.classifier)
        )

    return build


ARCHITECTURES: dict[str, Factory] = {
    "shapes_resnet": _own(_shapes_resnet),
    "shapes_vgg": _own(_shapes_vgg),
    **{n: _torchvision_resnet(n) for n in ("resnet18", "resnet34", "resnet50", "resnet101")},
    **{n: _torchvision_vgg(n) for n in ("vgg11", "vgg16", "vgg19")},
    **{n: _torchvision_densenet(n) for n in ("densenet121",)},
}


def build_architecture(
    name: str, num_classes: int, state_dict: StateDict | None = None
) -> SplitNetwork:
    """Instantiate architecture ``name``; random weights unless a ``state_dict`` is given.

    The state dict may be in :class:`SplitNetwork` layout (what ``model_store`` saves) or,
    for torchvision architectures, in torchvision's own key layout (what
    ``torch.save(model.state_dict())`` writes for a torchvision model).
    """
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
    if state_dict is not None and all(k.startswith(("features.", "head.")) for k in state_dict):
        network = factory(num_classes, None)
        network.load_state_dict(state_dict)
        return network
    return factory(num_classes, state_dict)

"""Tiny models and reference implementations for the attack, APEM and criticism tests.

The references are what the library's fast versions must agree with: the Explanation Filter
as Algorithm 2 reads, and a class's criticism inputs computed in-process from a model (what
the service's ``embed`` and ``robustness`` tasks return to the criticism job).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from handlers.attacks import evaluation_mode, get_attack
from handlers.attacks.base import check_images, device_of
from handlers.metrics.apem import ApemParams, apem
from handlers.metrics.explanation_filter import FilterOutcome, Stop, fraction_kept, quantise
from handlers.metrics.flip_search import SEARCHES, SearchStats
from handlers.models.architectures import SplitNetwork
from handlers.models.classifier import PixelClassifier
from handlers.models.derived import inference_embeddings
from protocol.criticism.methods import SelectionInputs, get_selection
from protocol.spec import Preprocessing
from protocol.validation import parse_params

PRE = Preprocessing(resize=8, crop=8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def tiny_cnn(classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64, bn: bool = True) -> PixelClassifier:
    """A small conv net (conv, BN, ReLU, max-pool, conv, 2x2 pooling, linear) in [0, 1] pixel space."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()]
    features = nn.Sequential(*layers)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))
    model = PixelClassifier(SplitNetwork(features, head), PRE).to(dtype)
    if bn:  # non-trivial running statistics
        bn_layer = features[1]
        bn_layer.running_mean.uniform_(-0.2, 0.2)
        bn_layer.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():  # sharper logits: predictions vary between images and flip
        head[-1].weight.mul_(8.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class LinearPixelModel(nn.Module):
    """``logits = W x + b`` on flattened pixels: flips along a line are known in closed form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def images(n: int, size: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, size, size), generator=generator).to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], training: bool = False) -> None:
    """Same state (parameters and buffers), same mode, no parameter gradient written."""
    assert model.training is training
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())


def explanation_filter_literal(
    model: nn.Module,
    image: torch.Tensor,
    relevance: torch.Tensor,
    target: int | None = None,
    apem_params: dict[str, Any] | ApemParams | None = None,
    levels: int | None = None,
) -> FilterOutcome:
    """[doValle2019, Alg. 2] line by line: one APEM per distinct value.

    The reference for :func:`~handlers.metrics.explanation_filter.explanation_filter`; slow
    on real maps. When no positive value is left, ``get_minimum_positive_value`` is undefined
    and the loop ends with that map.
    """
    ap = parse_params(ApemParams, apem_params)
    targets = None if target is None else torch.tensor([target])
    relevance_map = quantise(relevance, levels)
    distinct = int(torch.unique(relevance_map[relevance_map > 0]).numel())
    stats = SearchStats()

    def score(r: torch.Tensor) -> float:
        outcome = apem(model, image.unsqueeze(0), r.unsqueeze(0), targets=targets, params=ap)
        stats.add(outcome.stats)
        return outcome.apem

    current_apem = score(relevance_map)  # line 2
    before, removed, scored = current_apem, 0, 1
    while True:  # lines 3-9
        best_map, best_apem = relevance_map, current_apem  # lines 4-5
        if not (best_map > 0).any():
            stop: Stop = "map_exhausted"
            break
        min_val = best_map[best_map > 0].min()  # line 6
        relevance_map = torch.where(best_map == min_val, 0.0, best_map)  # line 7
        current_apem, scored = score(relevance_map), scored + 1  # line 8
        if current_apem < best_apem:  # line 9
            stop = "apem_dropped"
            break
        removed += 1
    return FilterOutcome(
        filtered=best_map,
        apem_before=before,
        apem_after=best_apem,
        fraction_kept=fraction_kept(relevance, best_map),
        values_removed=removed,
        candidates_scored=scored,
        stop=stop,
        stats=stats,
        approximate=SEARCHES[ap.search].approximate,
        distinct_values=distinct,
    )


def embeddings_and_probabilities(
    model: nn.Module, images: torch.Tensor, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-layer embeddings ``(n, d)`` and class probabilities ``(n, C)`` (float64).

    The embedding is ``model.embed`` (the global average of the last feature map), the
    representation MMD-critic works on [Stock2018, §3.3].
    """
    embeddings, probabilities = [], []
    with evaluation_mode(model), torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = check_images(images[start : start + batch_size]).to(device_of(model))
            embedded, logits = inference_embeddings(model, x)
            embeddings.append(embedded.double().cpu())
            probabilities.append(logits.double().softmax(dim=1).cpu())
    return torch.cat(embeddings).numpy(), torch.cat(probabilities).numpy()


def gather_inputs(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int,
    method: str,
    attack: str = "ifgsm",
    attack_params: Mapping[str, Any] | None = None,
    batch_size: int = 64,
) -> SelectionInputs:
    """What selection ``method`` needs about ``images`` of class ``class_index``, in-process.

    ``adversarial`` runs ``attack`` (default IFGSM with [Stock2018, §3.2]'s parameters)
    against the class label and records steps to flip and, as tie-break, the probability of
    the class after the attack; ``mmd`` and ``probs`` need one forward pass per batch.
    """
    selector = get_selection(method)  # fail early on unknown names
    n = images.shape[0]
    if "steps_to_flip" in selector.requires:
        labels = torch.full((n,), class_index, dtype=torch.long)
        result = get_attack(attack, attack_params).in_batches(model, images, labels, batch_size=batch_size)
        return SelectionInputs(
            steps_to_flip=result.steps_to_flip.numpy(),
            robustness=result.reference_confidence.double().numpy(),
        )
    if selector.requires:
        embeddings, probabilities = embeddings_and_probabilities(model, images, batch_size)
        return SelectionInputs(embeddings=embeddings, confidence=probabilities[:, class_index])
    return SelectionInputs(count=n)

"""The torch side of model criticism: what each selection method needs, from a model.

In the service the RQ workers get these numbers from TorchServe (``embed`` and
``robustness`` tasks) and call the torch-free :func:`protocol.criticism.select`; this
module does the same in-process (for the handler's tasks, the tests and the benchmarks).
It imports torch; :mod:`protocol.criticism` does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from handlers.attacks import evaluation_mode, get_attack
from handlers.attacks.base import check_images, device_of
from handlers.models.derived import inference_embeddings
from protocol.criticism.methods import Selection, SelectionInputs, get_selection


def embeddings_and_probabilities(
    model: nn.Module, images: torch.Tensor, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-layer embeddings ``(n, d)`` and class probabilities ``(n, C)`` (float64).

    The embedding is ``model.embed`` (the global average of the last feature map), the
    representation MMD-critic works on (paper 000, section 3.3).
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
    """What selection ``method`` needs about ``images`` of class ``class_index``.

    ``adversarial`` runs ``attack`` (default IFGSM with paper 000's parameters) against the
    class label and records steps to flip and, as tie-break, the probability of the class
    after the attack; ``mmd`` and ``probs`` need one forward pass per batch.
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


def criticise(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int,
    method: str,
    params: Mapping[str, Any] | None = None,
    attack: str = "ifgsm",
    attack_params: Mapping[str, Any] | None = None,
) -> Selection:
    """Prototypes and criticisms of one class in one call (paper 000, sections 2 and 3.3)."""
    inputs = gather_inputs(model, images, class_index, method, attack, attack_params)
    return get_selection(method).select(inputs, params)

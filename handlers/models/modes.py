"""Running a served model for one call without changing it for the next."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode for the block and restore its previous mode afterwards.

    Autograd is available inside even when the caller runs under ``torch.inference_mode``
    (as a model server may) or ``torch.no_grad``; inference tensors must be copied first.
    """
    was_training = model.training
    if not was_training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        yield  # nothing to switch: the common case of a served model, without two contexts
        return
    try:
        with torch.inference_mode(False), torch.enable_grad():
            if was_training:
                model.eval()
            yield
    finally:
        if was_training:
            model.train()

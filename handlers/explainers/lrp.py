"""Layer-wise Relevance Propagation: epsilon and alpha-beta rules on a canonized copy."""

from __future__ import annotations

from torch import Tensor, autograd, nn

from handlers.explainers.base import (
    Attribution,
    Explainer,
    register,
    resolve_targets,
    select_logits,
)
from handlers.explainers.lrp_core import AlphaBeta, Epsilon, Rule, active_rule, canonized
from handlers.models.classifier import PixelClassifier
from protocol.params.explainers import LRPParams


def make_rule(params: LRPParams) -> Rule:
    """A fresh rule object for ``params`` (it accumulates the absorbed relevance of one call)."""
    if params.rule == "epsilon":
        return Epsilon(params.epsilon, book_absorbed=params.book_absorbed)
    return AlphaBeta(params.alpha, params.beta, book_absorbed=params.book_absorbed)


@register("lrp")
class LRP(Explainer):
    """LRP of the target logit with the epsilon or alpha-beta rule ([doValle2019, §4.2.2]; [Bach2015]).

    The rule applies to every convolution and dense layer; batch norm is merged into the
    layer before it, the residual sum and average pooling redistribute proportionally to
    their inputs, ReLUs pass relevance through and max pooling routes it to the maximum
    (see :mod:`handlers.explainers.lrp_core`). The output relevance is the target logit, so
    ``Σ relevance + absorbed = logit``; ``extras`` report ``explained_logit``, ``absorbed``
    (by biases and ε, booked layer by layer when ``book_absorbed`` is set) and
    ``relevance_sum`` per image. One forward and one (modified) backward pass on a cached
    canonized copy; the served model is never touched.
    """

    Params = LRPParams

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Relevance of each pixel: its normalised value times the modified gradient."""
        if isinstance(model, PixelClassifier):
            normalized, network = model.normalize(images), model.network
        else:
            normalized, network = images, model
        inputs = normalized.detach().requires_grad_(True)
        copy = canonized(network, inputs.detach())
        with active_rule(make_rule(self.params)) as rule:
            logits = copy(inputs)
            targets = resolve_targets(logits, targets)
            explained = select_logits(logits, targets)
            (grad,) = autograd.grad(explained.sum(), inputs)
        relevance = inputs.detach() * grad
        extras = {
            "explained_logit": explained.detach().tolist(),
            "relevance_sum": relevance.flatten(1).sum(1).tolist(),
        }
        if rule.book_absorbed:
            absorbed = rule.absorbed.tolist() if rule.absorbed is not None else [0.0] * len(images)
            extras["absorbed"] = absorbed
        return Attribution(relevance, targets, extras)

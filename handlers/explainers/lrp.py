"""Layer-wise Relevance Propagation: epsilon and alpha-beta rules on a canonized copy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor, autograd, nn

from handlers.explainers.base import (
    Attribution,
    Explainer,
    ExplainerParams,
    register,
    resolve_targets,
    select_logits,
)
from handlers.explainers.lrp_core import AlphaBeta, Epsilon, Rule, active_rule, canonized
from handlers.models.classifier import PixelClassifier

_DEFAULTS = {"epsilon": {"epsilon": 1.0}, "alpha_beta": {"alpha": 2.0, "beta": -1.0}}


class LRPParams(ExplainerParams):
    """LRP parameters (thesis 003, section 4.2.2; the thesis uses the epsilon rule, ε = 1).

    Only the chosen rule's parameters may be given; the others stay None.
    """

    rule: Literal["epsilon", "alpha_beta"] = "epsilon"
    epsilon: float | None = Field(None, ge=0.0, description="epsilon rule stabiliser (default 1)")
    alpha: float | None = Field(None, gt=0.0, description="alpha-beta: positive weight (default 2)")
    beta: float | None = Field(None, le=0.0, description="alpha-beta: negative weight (default -1)")
    book_absorbed: bool = Field(
        False,
        description="also book the relevance absorbed by biases and the stabiliser layer by "
        "layer (extras['absorbed']): an independent conservation audit, about 10% slower",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_rule_defaults(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        rule = data.get("rule", "epsilon")
        own = _DEFAULTS.get(rule, {})
        for name in ("epsilon", "alpha", "beta"):
            if name not in own and data.get(name) is not None:
                raise ValueError(f"{name} does not apply to rule {rule!r}")
        return {**own, **data}

    @model_validator(mode="after")
    def _conserving(self) -> LRPParams:
        if self.rule == "alpha_beta" and abs(self.alpha + self.beta - 1.0) > 1e-9:
            raise ValueError("alpha + beta must equal 1 (thesis 003, section 4.2.2)")
        return self

    def make_rule(self) -> Rule:
        """A fresh rule object (it accumulates the absorbed relevance of one call)."""
        if self.rule == "epsilon":
            return Epsilon(self.epsilon, book_absorbed=self.book_absorbed)
        return AlphaBeta(self.alpha, self.beta, book_absorbed=self.book_absorbed)


@register("lrp")
class LRP(Explainer):
    """LRP of the target logit with the epsilon or alpha-beta rule (thesis 003, section 4.2.2).

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
    smoothable = True

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Relevance of each pixel: its normalised value times the modified gradient."""
        if isinstance(model, PixelClassifier):
            normalized, network = model.normalize(images), model.network
        else:
            normalized, network = images, model
        inputs = normalized.detach().requires_grad_(True)
        copy = canonized(network, inputs.detach())
        with active_rule(self.params.make_rule()) as rule:
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

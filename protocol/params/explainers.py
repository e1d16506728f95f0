"""Parameter models of the explanation methods and their registry (pydantic, torch-free).

Every method of :mod:`handlers.explainers` takes its parameters as one model of this module,
registered under the method's public name with :func:`register_params`. The gateway can
therefore refuse a bad ``params`` dict (:func:`protocol.validation.parse_params` over
:func:`explainer_params`) before TorchServe spends time on it, and
:func:`handlers.explainers.register` refuses, at import, an explainer whose ``Params`` is not
the model registered here under its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from protocol.budget import MAX_BATCH_SIZE
from protocol.validation import InvalidParameter, StrictParams, UnknownMethod, parse_params

__all__ = [
    "EXPLAINER_PARAMS",
    "MAX_LIME_SAMPLES",
    "MAX_PASSES",
    "MAX_SAMPLES",
    "BatchedParams",
    "ExplainerParams",
    "GradCamParams",
    "GradientParams",
    "IntegratedGradientsParams",
    "Interpolation",
    "LRPParams",
    "LimeParams",
    "NamParams",
    "Quadrature",
    "SisParams",
    "SmoothGradParams",
    "StochasticParams",
    "explainer_params",
    "register_params",
]

# Upper bounds on the work one request may ask for: a TorchServe worker serves one request
# at a time, so a request that runs for hours (or allocates what the host does not have)
# takes its worker away from everyone. Generous against the papers' values.
MAX_SAMPLES = 10_000  # SmoothGrad copies, IG steps (papers: 50-100)
MAX_LIME_SAMPLES = 20_000  # LIME builds all its masks at once ([Stock2018, §2]: 1000)
MAX_PASSES = 100_000  # SmoothGrad over another method: n x that method's passes per image
MAX_SELECTION_STEPS = 1000  # SIS: forward and backward passes of the backward selection


# --------------------------------------------------------------------------- bases
class ExplainerParams(StrictParams):
    """Base of every method's parameters: unknown names are refused, values are frozen."""

    smoothable: ClassVar[bool] = False
    """Whether SmoothGrad may wrap the method (name it as its ``base``)."""

    @property
    def passes_per_image(self) -> int:
        """Model passes (forward + backward) the method runs per explained image."""
        return 1


class StochasticParams(ExplainerParams):
    """Parameters of a stochastic method: a seed for its local ``torch.Generator``."""

    seed: int = Field(0, ge=0, description="seed of the method's own random generator")


class BatchedParams(ExplainerParams):
    """Parameters of a method that runs many model passes: images per pass."""

    batch_size: int = Field(
        64,
        ge=1,
        le=MAX_BATCH_SIZE,
        description="images per model pass (capped by pixels: protocol.budget)",
    )


# --------------------------------------------------------------------------- registry
EXPLAINER_PARAMS: dict[str, type[ExplainerParams]] = {}
"""Each explanation method's parameter model by its public name (``"lime"``, ...)."""

P = TypeVar("P", bound=type[ExplainerParams])


def register_params(name: str) -> Callable[[P], P]:
    """Class decorator: register ``name``'s parameter model in :data:`EXPLAINER_PARAMS`."""

    def decorator(cls: P) -> P:
        if EXPLAINER_PARAMS.get(name, cls) is not cls:
            raise ValueError(f"parameters of explainer {name!r} are already registered")
        EXPLAINER_PARAMS[name] = cls
        return cls

    return decorator


def explainer_params(name: str) -> type[ExplainerParams]:
    """The parameter model of method ``name`` (raises :class:`UnknownMethod`)."""
    try:
        return EXPLAINER_PARAMS[name]
    except KeyError:
        raise UnknownMethod("explanation method", name, list(EXPLAINER_PARAMS)) from None


# --------------------------------------------------------------------------- gradients
@register_params("gradient")
class GradientParams(ExplainerParams):
    """The gradient has no parameters."""

    smoothable: ClassVar[bool] = True


Interpolation = Literal["bilinear", "bicubic", "nearest"]


@register_params("gradcam")
class GradCamParams(ExplainerParams):
    """Grad-CAM parameters."""

    smoothable: ClassVar[bool] = True

    relu: bool = Field(True, description="keep only positive evidence [Selvaraju2017, eq. 2]")
    interpolation: Interpolation = Field("bilinear", description="upsampling to the image size")


Quadrature = Literal["gausslegendre", "riemann_middle", "riemann_trapezoid"]


@register_params("integrated_gradients")
class IntegratedGradientsParams(BatchedParams):
    """Integrated Gradients parameters ([Sundararajan2017, eq. 1] and its Riemann sum)."""

    smoothable: ClassVar[bool] = True

    steps: int = Field(
        50, ge=1, le=MAX_SAMPLES, description="points on the straight path (quadrature nodes)"
    )
    baseline: float = Field(
        0.0, ge=0.0, le=1.0, description="constant pixel value of the baseline image (0 = black)"
    )
    method: Quadrature = Field("gausslegendre", description="quadrature rule along the path")

    @property
    def passes_per_image(self) -> int:
        return self.steps


@register_params("smoothgrad")
class SmoothGradParams(StochasticParams, BatchedParams):
    """SmoothGrad parameters ([doValle2019, §4.2.1]; the thesis uses n=100, sigma=0.2)."""

    n: int = Field(100, ge=1, le=MAX_SAMPLES, description="number of noisy copies per image")
    sigma: float = Field(
        0.2, ge=0.0, description="noise standard deviation as a fraction of the image's value range"
    )
    base: str = Field("gradient", description="explainer averaged over the noisy copies")
    base_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("base")
    @classmethod
    def _smoothable(cls, base: str) -> str:
        try:
            model = explainer_params(base)
        except UnknownMethod as err:
            raise ValueError(str(err)) from None
        if not model.smoothable:
            raise ValueError(f"SmoothGrad cannot wrap {base!r}")
        return base

    @field_validator("base_params")
    @classmethod
    def _resolve_base_params(cls, raw: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "base" not in info.data:
            return raw
        try:
            resolved = parse_params(explainer_params(info.data["base"]), raw)
        except InvalidParameter as err:
            raise ValueError(str(err)) from None
        passes = info.data.get("n", 1) * resolved.passes_per_image
        if passes > MAX_PASSES:
            raise ValueError(
                f"n x the base's passes per image is {passes}, over {MAX_PASSES} per image"
            )
        return resolved.model_dump(mode="json")


_LRP_RULE_DEFAULTS = {"epsilon": {"epsilon": 1.0}, "alpha_beta": {"alpha": 2.0, "beta": -1.0}}


@register_params("lrp")
class LRPParams(ExplainerParams):
    """LRP parameters ([doValle2019, §4.2.2]; the thesis uses the epsilon rule, ε = 1).

    Only the chosen rule's parameters may be given; the others stay None.
    """

    smoothable: ClassVar[bool] = True

    rule: Literal["epsilon", "alpha_beta"] = "epsilon"
    epsilon: float | None = Field(None, ge=0.0, description="epsilon rule stabiliser (default 1)")
    alpha: float | None = Field(None, gt=0.0, description="alpha-beta: positive weight (default 2)")
    beta: float | None = Field(None, le=0.0, description="alpha-beta: negative weight (default -1)")
    book_absorbed: bool = Field(
        False,
        description="also book the relevance absorbed by biases and the stabiliser layer by "
        "layer (extras['absorbed']): an independent conservation audit, which makes the call slower",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_rule_defaults(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        rule = data.get("rule", "epsilon")
        own = _LRP_RULE_DEFAULTS.get(rule, {})
        for name in ("epsilon", "alpha", "beta"):
            if name not in own and data.get(name) is not None:
                raise ValueError(f"{name} does not apply to rule {rule!r}")
        return {**own, **data}

    @model_validator(mode="after")
    def _conserving(self) -> LRPParams:
        if self.rule == "alpha_beta" and abs(self.alpha + self.beta - 1.0) > 1e-9:
            raise ValueError("alpha + beta must equal 1 ([doValle2019, §4.2.2])")
        return self


# --------------------------------------------------------------------------- the others
@register_params("lime")
class LimeParams(StochasticParams, BatchedParams):
    """LIME parameters ([Stock2018, §2]: n = 1000, σ = 0.25, K kept constant)."""

    n: int = Field(
        1000,
        ge=1,
        le=MAX_LIME_SAMPLES,
        description="perturbed samples (the first is the unperturbed image)",
    )
    kernel_width: float = Field(0.25, gt=0.0, description="σ of the exponential kernel, eq. 5")
    num_features: int = Field(8, ge=1, description="K: superpixels the surrogate may use, eq. 7")
    n_segments: int = Field(
        50, ge=2, le=10_000, description="SLIC: approximate number of superpixels"
    )
    compactness: float = Field(10.0, gt=0.0, description="SLIC: colour vs. space trade-off")
    slic_sigma: float = Field(1.0, ge=0.0, description="SLIC: Gaussian pre-smoothing width")
    hide_color: Literal["mean"] | float = Field(
        0.5, description="fill of hidden superpixels: a grey level in [0, 1], or 'mean' colour"
    )
    surrogate: Literal["ridge", "lasso"] = "ridge"
    alpha: float | None = Field(
        None, ge=0.0, description="surrogate regularisation (1 ridge, 0.01 lasso)"
    )
    output: Literal["probability", "logit"] = "probability"
    batch_size: int = Field(
        128, ge=1, le=MAX_BATCH_SIZE, description="perturbed images per pass (capped by pixels)"
    )

    @model_validator(mode="after")
    def _resolve(self) -> LimeParams:
        if isinstance(self.hide_color, float) and not 0.0 <= self.hide_color <= 1.0:
            raise ValueError("hide_color must be 'mean' or a grey level in [0, 1]")
        if self.alpha is None:
            object.__setattr__(self, "alpha", 1.0 if self.surrogate == "ridge" else 0.01)
        return self


@register_params("nam")
class NamParams(ExplainerParams):
    """NAM parameters ([Singla2022, App. A.1])."""

    feature: int | None = Field(
        None, ge=0, description="penultimate-layer feature; default: the target's most important"
    )
    interpolation: Interpolation = Field("bilinear", description="resizing to the image size")


@register_params("sis")
class SisParams(ExplainerParams):
    """Backward selection of the ``sis`` explainer ([Carter2021]: 95 % of the image masked,
    so 5 % kept); checked by the gateway when an overinterpretation job arrives."""

    threshold: float = Field(
        0.9, gt=0.0, lt=1.0, description="tau: target probability a subset must keep to be sufficient"
    )
    keep_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="share of pixels kept for the confidence check (paper: 0.05)"
    )
    step_fraction: float = Field(
        0.02,
        ge=1.0 / MAX_SELECTION_STEPS,
        le=0.5,
        description="share of all pixels removed per selection step (one forward and backward pass)",
    )
    mask_value: Literal["mean"] | float = Field(
        "mean",
        description="what a masked pixel shows: 'mean' (the model's normalisation mean, zero after "
        "normalising) or a grey level in [0, 1]",
    )
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE, description="images per model pass (capped by pixels)")

    @model_validator(mode="after")
    def _check_mask_value(self) -> SisParams:
        if isinstance(self.mask_value, float) and not 0.0 <= self.mask_value <= 1.0:
            raise ValueError("mask_value must be 'mean' or a grey level in [0, 1]")
        return self

    @property
    def passes_per_image(self) -> int:
        return math.ceil(1.0 / self.step_fraction) + 1

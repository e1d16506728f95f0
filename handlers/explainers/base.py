"""The explainer protocol, its result, parameter validation and the method registry.

Every explanation method is one small :class:`Explainer` subclass with one abstract method,
:meth:`Explainer.attribute`, registered under its public name with :func:`register`. The
base class owns what all methods share: parameter validation (a pydantic model per method,
kept torch-free in :mod:`protocol.params.explainers`, whose errors surface as
:class:`InvalidParameter`), input checks, target resolution (default: the predicted class),
autograd and eval mode for the duration of one call.

Relevance is always a ``(B, C, H, W)`` float32 tensor of the input's shape, in [0, 1] pixel
space (the served :class:`~handlers.models.classifier.PixelClassifier` normalises inside).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from handlers.models.derived import fused_classifier, inference_logits
from handlers.models.modes import evaluation_mode
from protocol.params.explainers import EXPLAINER_PARAMS, ExplainerParams
from protocol.validation import InvalidParameter, UnknownMethod, check_class_index, parse_params

__all__ = [
    "Attribution",
    "Explainer",
    "ExplainerParams",
    "Explanation",
    "InvalidParameter",
    "UnknownMethod",
    "available_explainers",
    "create_explainer",
    "explain",
    "get_explainer",
    "register",
    "resolve_targets",
    "select_logits",
]


# --------------------------------------------------------------------------- results
class Attribution(NamedTuple):
    """What :meth:`Explainer.attribute` returns: relevance, resolved targets, extras."""

    relevance: Tensor
    targets: Tensor
    extras: dict[str, Any] = {}


@dataclass(frozen=True)
class Explanation:
    """One explainer call's result.

    Attributes:
        method: Registered name of the method.
        relevance: ``(B, C, H, W)`` float32, detached, same shape and device as the input.
        targets: ``(B,)`` int64 classes that were explained.
        params: The fully resolved parameters (defaults filled in), JSON-friendly.
        extras: Method-specific results (e.g. LIME's ``segments`` and ``weights``); numpy
            arrays in it must be encoded with :func:`protocol.arrays.encode_array`.
    """

    method: str
    relevance: Tensor
    targets: Tensor
    params: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- targets
def select_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits[b, targets[b]]`` for every row ``b``."""
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def resolve_targets(logits: Tensor, targets: Tensor | None) -> Tensor:
    """Targets to explain: the predicted classes when ``targets`` is None, else checked.

    Given targets are checked where they live (the caller's CPU tensor: no device sync)
    against ``logits.shape[1]`` and then moved to the logits' device.

    Raises:
        InvalidParameter: A target is outside ``[0, num_classes)``.
    """
    if targets is None:
        return logits.detach().argmax(dim=1)
    check_target_range(targets, logits.shape[1])
    return targets.to(logits.device, non_blocking=True)


def check_target_range(targets: Tensor, num_classes: int) -> None:
    """Raise :class:`~protocol.validation.ClassOutOfRange` for a target outside ``[0, num_classes)``.

    Checked on the host over the ``B`` integers (``tolist``), not with three comparison
    kernels and a reduction, which were a visible share of a millisecond explanation
    (benchmarks/results/explain.md).
    """
    check_class_index("target", targets.tolist(), num_classes)


def _check_inputs(images: Tensor, targets: Tensor | int | None) -> tuple[Tensor, Tensor | None]:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, C, H, W) tensor, got {tuple(images.shape)}")
    if targets is None:
        return images, None
    targets = torch.as_tensor(targets).reshape(-1)  # stays where the caller has it
    if targets.is_floating_point() or targets.numel() != images.shape[0]:
        raise InvalidParameter("target", f"need {images.shape[0]} integer class indices")
    return images, targets.long()


# --------------------------------------------------------------------------- protocol
class Explainer(ABC):
    """One explanation method: validated parameters plus one abstract :meth:`attribute`.

    Use :meth:`explain` (the template method); subclasses implement :meth:`attribute`.

    Attributes:
        name: The registered public name (set by :func:`register`).
        Params: The method's pydantic parameter model: the one
            :mod:`protocol.params.explainers` registers under :attr:`name` (whose
            ``smoothable`` says whether SmoothGrad may wrap this method).
        input_gradients_only: Whether :meth:`attribute` only differentiates the logits with
            respect to its input (no hooks, no layers by name), so that it may run through
            the model's fused copy (:meth:`network_for`).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[ExplainerParams]] = ExplainerParams
    input_gradients_only: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, Any] | BaseModel | None = None) -> None:
        """Validate ``params`` (raises :class:`InvalidParameter`)."""
        self.params = parse_params(self.Params, params)

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | int | None = None
    ) -> Explanation:
        """Explain ``model``'s scores for ``targets`` on ``images``.

        Args:
            model: Classifier taking ``(B, C, H, W)`` images in [0, 1]; never modified.
            images: Preprocessed images, ``(B, C, H, W)`` float in [0, 1].
            targets: ``(B,)`` class indices, or None for the predicted classes.

        Returns:
            The explanation; ``relevance`` has the input's shape.

        Raises:
            InvalidParameter: A target is out of range, or a parameter does not fit the input.
        """
        images, targets = _check_inputs(images, targets)
        with evaluation_mode(model):
            images = images.clone() if images.is_inference() else images.detach()
            targets = None if targets is None else targets.clone()
            result = self.attribute(self.network_for(model, images), images, targets)
        relevance = result.relevance.detach().to(torch.float32)
        if relevance.shape != images.shape:
            raise RuntimeError(
                f"{self.name} returned {tuple(relevance.shape)} for {tuple(images.shape)}"
            )
        return Explanation(
            method=self.name,
            relevance=relevance,
            targets=result.targets.detach().long(),
            params=self.params.model_dump(mode="json"),
            extras=dict(result.extras),
        )

    @abstractmethod
    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Attribution:
        """Compute the relevance of ``images`` (detached, autograd enabled, eval mode).

        Implementations resolve ``targets`` with :func:`resolve_targets` on the first logits
        they compute.
        """

    @classmethod
    def pictures(cls, explanation: Explanation, image: Tensor, outputs: set[str]) -> dict[str, bytes]:
        """The method's own pictures of the first image, beyond its map's heatmap and overlay.

        ``image`` is that image ``(C, H, W)`` in [0, 1]; ``outputs`` the picture names the
        client asked for (``protocol.contract.ImageOutput``). Returns name -> PNG bytes for
        the asked ones this method draws (LIME its superpixels, SIS its subset); none by
        default. A method with pictures of its own overrides this, in its own module.
        """
        return {}

    def network_for(self, model: nn.Module, images: Tensor) -> nn.Module:
        """What :meth:`attribute` runs: the model's fused copy
        (:class:`~handlers.models.derived.FusedClassifier`: batch norm folded, channels-last;
        the same function to float rounding, cheaper input gradients:
        benchmarks/results/explain.md) for a method
        with :attr:`input_gradients_only`, the model itself otherwise."""
        return fused_classifier(model, images) if self.input_gradients_only else model

    def predicted_targets(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Tensor:
        """Resolve targets with one pass of the fused inference copy (multi-sample methods).

        The copy (:func:`~handlers.models.derived.inference_logits`) is what the prediction
        task scores with, so the default target is the class the service predicts.
        """
        return resolve_targets(inference_logits(model, images).clone(), targets)


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Explainer]] = {}

E = TypeVar("E", bound=type[Explainer])


def register(name: str) -> Callable[[E], E]:
    """Class decorator: register an :class:`Explainer` under ``name``.

    Raises:
        ValueError: Another class is registered as ``name``.
        TypeError: The class's ``Params`` is not the model that
            :mod:`protocol.params.explainers` registers under ``name``.
    """

    def decorator(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"explainer {name!r} is already registered")
        if EXPLAINER_PARAMS.get(name) is not cls.Params:
            raise TypeError(
                f"{cls.__name__}.Params must be protocol.params.explainers' model for {name!r}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_explainers() -> list[str]:
    """Names of all registered explainers, sorted."""
    return sorted(_REGISTRY)


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered as ``name`` (raises :class:`UnknownMethod`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethod("explanation method", name, available_explainers()) from None


def create_explainer(name: str, params: Mapping[str, Any] | None = None) -> Explainer:
    """An explainer instance with validated parameters.

    Raises:
        UnknownMethod: ``name`` is not registered.
        InvalidParameter: ``params`` do not validate.
    """
    return get_explainer(name)(params)


def explain(
    model: nn.Module,
    images: Tensor,
    method: str,
    params: Mapping[str, Any] | None = None,
    targets: Tensor | int | None = None,
) -> Explanation:
    """One call from name to explanation: ``create_explainer(method, params).explain(...)``."""
    return create_explainer(method, params).explain(model, images, targets)


def chunks(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))

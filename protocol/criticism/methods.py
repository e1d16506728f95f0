"""Selection methods behind one interface and a registry (torch-free).

``select(method, inputs, params)`` picks prototypes and criticisms among ``n`` examples of
one class from :class:`SelectionInputs` (plain numpy arrays the RQ workers gathered from
TorchServe: embeddings, class probabilities, steps to flip). Each method declares which
inputs it needs in :attr:`SelectionMethod.requires`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
from pydantic import Field, model_validator

from protocol.criticism import selection as sel
from protocol.validation import InvalidParameter, StrictParams, UnknownMethod, parse_params


@dataclass(frozen=True)
class SelectionInputs:
    """What the methods select from, one entry per example of the class (numpy only).

    Attributes:
        embeddings: ``(n, d)`` penultimate-layer embeddings (``mmd``).
        confidence: ``(n,)`` probability of the class under study (``probs``).
        steps_to_flip: ``(n,)`` IFGSM steps to flip, -1 for never (``adversarial``).
        robustness: ``(n,)`` optional tie-break for ``adversarial``: probability of the
            true class after the ``M`` steps.
        count: ``n``, needed by ``random`` when nothing else is given.
    """

    embeddings: np.ndarray | None = None
    confidence: np.ndarray | None = None
    steps_to_flip: np.ndarray | None = None
    robustness: np.ndarray | None = None
    count: int | None = None

    @property
    def n(self) -> int:
        for value in (self.embeddings, self.confidence, self.steps_to_flip):
            if value is not None:
                return len(value)
        if self.count is None:
            raise InvalidParameter("inputs", "no examples given")
        return self.count


@dataclass(frozen=True)
class SelectedItem:
    """One chosen example: its index in the inputs and its score (see ``score_name``)."""

    index: int
    score: float | None


@dataclass(frozen=True)
class Selection:
    """Prototypes and criticisms, best first, with the score each was ranked by."""

    method: str
    score_name: str
    prototypes: list[SelectedItem]
    criticisms: list[SelectedItem]
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class SelectionParams(StrictParams):
    """Common parameters: how many prototypes and criticisms to return."""

    prototypes: int = Field(3, ge=0, le=1000)
    criticisms: int = Field(3, ge=0, le=1000)


class MMDParams(SelectionParams):
    """MMD-critic: RBF bandwidth (``None``: median heuristic) and the log-det weight."""

    bandwidth: float | None = Field(None, gt=0)
    lam: float = Field(1e-5, ge=0)


class AdversarialParams(SelectionParams):
    """Adversarial criticism: whether already-misclassified examples count as criticisms."""

    include_misclassified: bool = False


class ProbsParams(SelectionParams):
    """Probability baseline thresholds ([Stock2018, §3.3]: 0.9 and 0.1)."""

    high: float = Field(0.9, ge=0, le=1)
    low: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> ProbsParams:
        if self.low > self.high:
            raise InvalidParameter("low", f"must not exceed high ({self.high}), got {self.low}")
        return self


class RandomParams(SelectionParams):
    """Random baseline seed."""

    seed: int = Field(0, ge=0)


class SelectionMethod(ABC):
    """One way of choosing prototypes and criticisms (implement :meth:`pick`)."""

    name: ClassVar[str] = ""
    score_name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    params_model: ClassVar[type[SelectionParams]] = SelectionParams

    def select(self, inputs: SelectionInputs, params: Mapping[str, Any] | SelectionParams | None = None) -> Selection:
        """Validate, check the inputs this method needs, pick, and package the result."""
        parsed = parse_params(self.params_model, params)
        for name in self.requires:
            if getattr(inputs, name) is None:
                raise InvalidParameter(name, f"selection method {self.name!r} needs {name}")
        (protos, p_scores), (crits, c_scores), details = self.pick(inputs, parsed)
        return Selection(
            method=self.name,
            score_name=self.score_name,
            prototypes=_items(protos, p_scores),
            criticisms=_items(crits, c_scores),
            params=parsed.model_dump(),
            details=details,
        )

    @abstractmethod
    def pick(self, inputs: SelectionInputs, params: Any) -> tuple[sel.Picked, sel.Picked, dict[str, Any]]:
        """Return ``(prototypes, scores)``, ``(criticisms, scores)`` and extra details."""


def _items(indices: np.ndarray, scores: np.ndarray) -> list[SelectedItem]:
    return [
        SelectedItem(int(i), None if not np.isfinite(s) else float(s))
        for i, s in zip(indices.tolist(), np.asarray(scores, dtype=np.float64).tolist(), strict=True)
    ]


M = TypeVar("M", bound=type[SelectionMethod])
_REGISTRY: dict[str, type[SelectionMethod]] = {}


def register_selection(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`SelectionMethod` available under ``name``."""

    def decorate(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"selection method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_selection(name: str) -> SelectionMethod:
    """The selection method registered as ``name`` (raises :class:`UnknownMethod`)."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise UnknownMethod("selection method", name, list(_REGISTRY)) from None


def available_selections() -> list[str]:
    return sorted(_REGISTRY)


def select(
    method: str, inputs: SelectionInputs, params: Mapping[str, Any] | SelectionParams | None = None
) -> Selection:
    """Select prototypes and criticisms with the method registered as ``method``."""
    return get_selection(method).select(inputs, params)


@register_selection("adversarial")
class AdversarialSelection(SelectionMethod):
    """[Stock2018, §3.3]: never flipped within ``M`` IFGSM steps vs. flipped soonest."""

    score_name = "steps_to_flip"
    requires = ("steps_to_flip",)
    params_model = AdversarialParams

    def pick(self, inputs: SelectionInputs, params: Any) -> tuple[sel.Picked, sel.Picked, dict[str, Any]]:
        protos, crits = sel.adversarial_selection(
            inputs.steps_to_flip,  # type: ignore[arg-type]
            params.prototypes,
            params.criticisms,
            inputs.robustness,
            params.include_misclassified,
        )
        details: dict[str, Any] = {}
        if inputs.robustness is not None:  # what ranks the prototypes (all "never" flipped)
            robustness = np.asarray(inputs.robustness, dtype=np.float64)
            details["robustness"] = {
                "meaning": "probability of the clean prediction after the attack",
                "prototypes": robustness[protos[0]].tolist(),
                "criticisms": robustness[crits[0]].tolist(),
            }
        return _never_as_nan(protos), _never_as_nan(crits), details


def _never_as_nan(picked: sel.Picked) -> sel.Picked:
    """Steps-to-flip scores with "never" (-1) as NaN, reported as ``None``."""
    indices, steps = picked
    return indices, np.where(steps < 0, np.nan, steps.astype(np.float64))


@register_selection("mmd")
class MMDCriticSelection(SelectionMethod):
    """MMD-critic on embeddings ([Stock2018, §2, eq. 3]; [Kim2016]).

    Prototype scores are ``J_b`` of the prototype set after each pick, criticism scores
    their witness values.
    """

    score_name = "witness"
    requires = ("embeddings",)
    params_model = MMDParams

    def pick(self, inputs: SelectionInputs, params: Any) -> tuple[sel.Picked, sel.Picked, dict[str, Any]]:
        protos, crits, sigma = sel.mmd_critic(
            np.asarray(inputs.embeddings), params.prototypes, params.criticisms, params.bandwidth, params.lam
        )
        return protos, crits, {"bandwidth": sigma, "prototype_score": "J_b"}


@register_selection("probs")
class ProbabilitySelection(SelectionMethod):
    """[Stock2018, §3.3] baseline: confidence above ``high`` vs. below ``low``."""

    score_name = "confidence"
    requires = ("confidence",)
    params_model = ProbsParams

    def pick(self, inputs: SelectionInputs, params: Any) -> tuple[sel.Picked, sel.Picked, dict[str, Any]]:
        protos, crits = sel.probability_selection(
            inputs.confidence,  # type: ignore[arg-type]
            params.prototypes,
            params.criticisms,
            params.high,
            params.low,
        )
        return protos, crits, {}


@register_selection("random")
class RandomSelection(SelectionMethod):
    """[Stock2018, §3.3] baseline: a seeded random sample of the class."""

    score_name = "draw"
    params_model = RandomParams

    def pick(self, inputs: SelectionInputs, params: Any) -> tuple[sel.Picked, sel.Picked, dict[str, Any]]:
        protos, crits = sel.random_selection(inputs.n, params.prototypes, params.criticisms, params.seed)
        return protos, crits, {}

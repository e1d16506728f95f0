"""Parameter models of the gradient-sign attack family (pydantic, torch-free).

All budgets are in the classifier's [0, 1] pixel space (normalisation happens inside the
model wrapper). The defaults of :class:`IFGSMParams` are [Stock2018, §3.2]'s: step
size 0.001, ``M = 10`` iterations.

Each model turns itself into the same :class:`CoreSettings` (``core()``), so FGSM and PGD
are the iterative FGSM with other settings rather than separate implementations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field, model_validator

from protocol.validation import InvalidParameter, StrictParams

Norm = Literal["linf", "l2"]
MAX_STEPS = 1000


@dataclass(frozen=True)
class CoreSettings:
    """Everything the iterative core needs, whatever attack the user asked for.

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        iterations: number of gradient steps ``M``.
        alpha: step size.
        budget: projection radius, or ``None`` for no projection.
        target: targeted attack towards this class, or ``None``.
        stop_at_flip: freeze an image once the attack succeeded on it.
        random_start: start from a random point of the ``budget`` ball.
        seed: seed of the random start.
    """

    norm: Norm
    iterations: int
    alpha: float
    budget: float | None
    target: int | None = None
    stop_at_flip: bool = True
    random_start: bool = False
    seed: int | None = None


class AttackParams(StrictParams):
    """What every gradient-sign attack accepts.

    Attributes:
        norm: geometry of the step and of the budget: ``"linf"`` (sign of the gradient,
            box projection) or ``"l2"`` (normalised gradient, ball projection).
        target: if set, a targeted attack towards this class index for every image
            (success = the prediction equals it); otherwise untargeted.
        stop_at_flip: stop changing an image as soon as the attack has succeeded on it.
            With ``False`` every image takes all steps (torchattacks' behaviour).
    """

    norm: Norm = "linf"
    target: int | None = Field(None, ge=0)
    stop_at_flip: bool = True

    def core(self) -> CoreSettings:
        """The settings of the one iterative core that every attack of the family runs."""
        raise NotImplementedError

    def _settings(self, iterations: int, alpha: float, budget: float | None) -> CoreSettings:
        return CoreSettings(
            norm=self.norm,
            iterations=iterations,
            alpha=alpha,
            budget=budget,
            target=self.target,
            stop_at_flip=self.stop_at_flip,
        )

    def _check_linf(self, name: str, value: float | None) -> None:
        if self.norm == "linf" and value is not None and value > 1:
            raise InvalidParameter(name, f"an L-inf size in [0, 1] pixel units is at most 1, got {value}")


class IFGSMParams(AttackParams):
    """Iterative FGSM / BIM ([Stock2018, §2, §3.2]; [Kurakin2017]).

    Attributes:
        step_size: size of one step (``alpha``); [Stock2018, §3.2] uses 0.001.
        steps: number of iterations ``M``; [Stock2018, §3.2] uses 10.
        eps: radius of the ball the perturbation is projected onto after every step;
            ``None`` (default) means no projection (only the [0, 1] box), as in [Stock2018],
            where the size is bounded by ``steps * step_size`` anyway.
    """

    step_size: float = Field(0.001, gt=0)
    steps: int = Field(10, ge=1, le=MAX_STEPS)
    eps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _sizes(self) -> IFGSMParams:
        self._check_linf("step_size", self.step_size)
        self._check_linf("eps", self.eps)
        return self

    def core(self) -> CoreSettings:
        return self._settings(self.steps, self.step_size, self.eps)


class FGSMParams(AttackParams):
    """FGSM ([Stock2018, §2]; [Goodfellow2015]): one step of size ``eps``, i.e. IFGSM with ``M = 1``."""

    eps: float = Field(0.01, gt=0)

    @model_validator(mode="after")
    def _sizes(self) -> FGSMParams:
        self._check_linf("eps", self.eps)
        return self

    def core(self) -> CoreSettings:
        return self._settings(1, self.eps, self.eps)


class PGDParams(IFGSMParams):
    """PGD [Madry2018]: IFGSM from a random point of the ``eps`` ball, projected each step.

    Attributes:
        eps: radius of the ball (required; default 8/255).
        step_size: default 2/255.
        random_start: start from a uniformly random point of the L-inf box, or for L2
            from a random direction with a uniform radius (torchattacks' convention).
        seed: seed of the random start; ``None`` draws a fresh one.
    """

    eps: float = Field(8 / 255, gt=0)  # type: ignore[assignment]
    step_size: float = Field(2 / 255, gt=0)
    random_start: bool = True
    seed: int | None = Field(0, ge=0)

    def core(self) -> CoreSettings:
        settings = self._settings(self.steps, self.step_size, self.eps)
        return replace(settings, random_start=self.random_start, seed=self.seed)


PARAMS_BY_ATTACK: dict[str, type[AttackParams]] = {
    "fgsm": FGSMParams,
    "ifgsm": IFGSMParams,
    "pgd": PGDParams,
}
"""Each attack's parameter model by its canonical name, importable without torch (the
gateway checks a job's attack parameters with it); a test keeps it equal to the registry's."""

SERVICE_NAMES = {"epsilon": "eps", "target_class": "target"}
"""The HTTP API's names of attack parameters -> the library's."""


def library_names(params: Mapping[str, Any]) -> dict[str, Any]:
    """Attack parameters as the service names them, renamed for the library."""
    return {SERVICE_NAMES.get(k, k): v for k, v in params.items()}

"""Parameter models of the gradient-sign attack family (pydantic, torch-free).

All budgets are in the classifier's [0, 1] pixel space (normalisation happens inside the
model wrapper). The defaults of :class:`IFGSMParams` are [Stock2018, §3.2]'s: step
size 0.001, ``M = 10`` iterations.

Each model turns itself into the same :class:`CoreSettings` (``core()``), so FGSM and PGD
are the iterative FGSM with other settings rather than separate implementations.

The names are the HTTP API's (``epsilon``, ``target_class``, ``step_size``, ``steps``): a
request's ``params`` reach these models as sent, and the models are the one check of them
(the gateway validates a request with the same model before queueing any work).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pydantic import Field, model_validator

from protocol.validation import InvalidParameter, StrictParams

Norm = Literal["linf", "l2"]
MAX_STEPS = 1000


@dataclass(frozen=True)
class CoreSettings:
    """Everything the iterative core needs, whatever attack the user asked for.

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        steps: number of gradient steps ``M``.
        step_size: size of one step (``alpha`` in [Stock2018, §2, eq. 2]).
        epsilon: projection radius, or ``None`` for no projection.
        target_class: targeted attack towards this class, or ``None``.
        stop_at_flip: freeze an image once the attack succeeded on it.
        random_start: start from a random point of the ``epsilon`` ball.
        seed: seed of the random start.
    """

    norm: Norm
    steps: int
    step_size: float
    epsilon: float | None
    target_class: int | None = None
    stop_at_flip: bool = True
    random_start: bool = False
    seed: int | None = None


class AttackParams(StrictParams):
    """What every gradient-sign attack accepts.

    Attributes:
        norm: geometry of the step and of the budget: ``"linf"`` (sign of the gradient,
            box projection) or ``"l2"`` (normalised gradient, ball projection).
        target_class: if set, a targeted attack towards this class index for every image
            (success = the prediction equals it); otherwise untargeted. Its range is
            checked against the model (:func:`protocol.validation.check_class_index`).
        stop_at_flip: stop changing an image as soon as the attack has succeeded on it.
            With ``False`` every image takes all steps (torchattacks' behaviour).
    """

    norm: Norm = "linf"
    target_class: int | None = Field(None, ge=0)
    stop_at_flip: bool = True

    def core(self) -> CoreSettings:
        """The settings of the one iterative core that every attack of the family runs."""
        raise NotImplementedError

    def _settings(self, steps: int, step_size: float, epsilon: float | None) -> CoreSettings:
        return CoreSettings(
            norm=self.norm,
            steps=steps,
            step_size=step_size,
            epsilon=epsilon,
            target_class=self.target_class,
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
        epsilon: radius of the ball the perturbation is projected onto after every step;
            ``None`` (default) means no projection (only the [0, 1] box), as in [Stock2018],
            where the size is bounded by ``steps * step_size`` anyway.
    """

    step_size: float = Field(0.001, gt=0)
    steps: int = Field(10, ge=1, le=MAX_STEPS)
    epsilon: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _sizes(self) -> IFGSMParams:
        self._check_linf("step_size", self.step_size)
        self._check_linf("epsilon", self.epsilon)
        return self

    def core(self) -> CoreSettings:
        return self._settings(self.steps, self.step_size, self.epsilon)


class FGSMParams(AttackParams):
    """FGSM ([Stock2018, §2]; [Goodfellow2015]): one step of size ``epsilon``, i.e. IFGSM with ``M = 1``."""

    epsilon: float = Field(0.01, gt=0)

    @model_validator(mode="after")
    def _sizes(self) -> FGSMParams:
        self._check_linf("epsilon", self.epsilon)
        return self

    def core(self) -> CoreSettings:
        return self._settings(1, self.epsilon, self.epsilon)


class PGDParams(IFGSMParams):
    """PGD [Madry2018]: IFGSM from a random point of the ``epsilon`` ball, projected each step.

    Attributes:
        epsilon: radius of the ball (required; default 8/255).
        step_size: default 2/255.
        random_start: start from a uniformly random point of the L-inf box, or for L2
            from a random direction with a uniform radius (torchattacks' convention).
        seed: seed of the random start; ``None`` draws a fresh one.
    """

    epsilon: float = Field(8 / 255, gt=0)  # type: ignore[assignment]
    step_size: float = Field(2 / 255, gt=0)
    random_start: bool = True
    seed: int | None = Field(0, ge=0)

    def core(self) -> CoreSettings:
        settings = self._settings(self.steps, self.step_size, self.epsilon)
        return replace(settings, random_start=self.random_start, seed=self.seed)


PARAMS_BY_ATTACK: dict[str, type[AttackParams]] = {
    "fgsm": FGSMParams,
    "ifgsm": IFGSMParams,
    "pgd": PGDParams,
}
"""Each attack's parameter model by its canonical name, importable without torch (the
gateway checks a request's and a job's attack parameters with it); a test keeps it equal
to the registry's."""

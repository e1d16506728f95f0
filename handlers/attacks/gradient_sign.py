"""FGSM, iterative FGSM (BIM) and PGD: one iterative core, three settings (STYLE 2).

[Stock2018, §2, eq. 2]: for ``p = inf`` the step is ``alpha * sign(grad)``,
for ``p = 2`` it is ``alpha * grad / ||grad||_2``. :class:`IterativeFGSM` takes ``M`` such
steps, each followed by the projection onto the budget ball and the [0, 1] box;
:class:`FGSM` is one step of size ``epsilon``; :class:`PGD` adds a random start.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from handlers.attacks.base import Attack, register_attack
from protocol.params.attacks import AttackParams, FGSMParams, IFGSMParams, Norm, PGDParams

_TINY = 1e-12


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class LinfGeometry:
    """Steepest ascent and projection for the L-inf ball ([Stock2018, eq. 2] with p = inf)."""

    @staticmethod
    def direction(grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    @staticmethod
    def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
        return delta.clamp(-eps, eps)

    @staticmethod
    def random_delta(like: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
        """Uniform in the box ``[-eps, eps]^d``."""
        noise = torch.rand(like.shape, generator=generator, dtype=like.dtype)
        return ((2 * noise - 1) * eps).to(like.device)


class L2Geometry:
    """Steepest ascent and projection for the L2 ball ([Stock2018, eq. 2] with p = 2)."""

    @staticmethod
    def direction(grad: torch.Tensor) -> torch.Tensor:
        return grad / (_per_sample_norm(grad) + _TINY)

    @staticmethod
    def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
        norms = _per_sample_norm(delta)
        return delta * torch.clamp(eps / (norms + _TINY), max=1.0)

    @staticmethod
    def random_delta(like: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
        """A Gaussian direction scaled to a radius drawn uniformly in ``[0, eps]``."""
        direction = torch.randn(like.shape, generator=generator, dtype=like.dtype)
        radius = torch.rand((like.shape[0],) + (1,) * (like.dim() - 1), generator=generator)
        return (direction / (_per_sample_norm(direction) + _TINY) * radius * eps).to(like.device)


GEOMETRIES: dict[Norm, type[LinfGeometry] | type[L2Geometry]] = {
    "linf": LinfGeometry,
    "l2": L2Geometry,
}


@register_attack("ifgsm", "bim", "ifgm")
class IterativeFGSM(Attack):
    """Iterative fast gradient (sign) method ([Stock2018, §2]; the BIM of [Kurakin2017]).

    ``x_{t+1} = clip_[0,1](x + P_epsilon(x_t + step_size * d(grad) - x))`` with ``d`` the
    sign (L-inf) or the normalised gradient (L2) and ``P_epsilon`` the projection onto the
    ``epsilon`` ball (skipped when ``epsilon`` is None). [Stock2018, §3.2]: ``alpha = 0.001``,
    ``M = 10``.
    """

    params_model: ClassVar[type[AttackParams]] = IFGSMParams

    def __init__(self, params: object = None) -> None:
        super().__init__(params)  # type: ignore[arg-type]
        self.geometry = GEOMETRIES[self.settings.norm]

    def _step(self, x_adv: torch.Tensor, grad: torch.Tensor, x_clean: torch.Tensor) -> torch.Tensor:
        """One step of [Stock2018, eq. 2], then the projections."""
        moved = x_adv + self.settings.step_size * self.geometry.direction(grad)
        if self.settings.epsilon is None:
            return moved.clamp(0.0, 1.0)
        delta = self.geometry.project(moved - x_clean, self.settings.epsilon)
        return (x_clean + delta).clamp(0.0, 1.0)


@register_attack("fgsm", "fgm")
class FGSM(IterativeFGSM):
    """Fast gradient sign method ([Stock2018, §2]; [Goodfellow2015]): IFGSM with one step of size ``epsilon``."""

    params_model: ClassVar[type[AttackParams]] = FGSMParams


@register_attack("pgd")
class PGD(IterativeFGSM):
    """Projected gradient descent [Madry2018]: IFGSM from a random point of the ball.

    The random start is drawn on the CPU from a generator seeded with ``params.seed``, so
    the same seed gives the same start on every device.
    """

    params_model: ClassVar[type[AttackParams]] = PGDParams

    def _start(self, images: torch.Tensor) -> torch.Tensor:
        """Uniform point of the ``epsilon`` box (L-inf) or ball (L2), clipped to [0, 1]."""
        if not self.settings.random_start or self.settings.epsilon is None:
            return images
        generator = torch.Generator()
        if self.settings.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.settings.seed)
        delta = self.geometry.random_delta(images, self.settings.epsilon, generator)
        return (images + delta).clamp(0.0, 1.0)

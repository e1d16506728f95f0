"""Adversarial attacks in the classifier's [0, 1] pixel space: FGSM, iterative FGSM, PGD.

Use ``get_attack(name, params)(model, images, labels=None, targets=None)``; the result is an
:class:`AttackBatchResult`. Importing this package registers every attack.

Citations such as ``[Stock2018, §2, eq. 2]`` are keys into ``docs/references.md``.
"""

from handlers.attacks.base import (
    NEVER,
    Attack,
    AttackBatchResult,
    available_attacks,
    evaluation_mode,
    get_attack,
    register_attack,
)
from handlers.attacks.gradient_sign import FGSM, PGD, IterativeFGSM
from protocol.params.attacks import AttackParams, FGSMParams, IFGSMParams, PGDParams

__all__ = [
    "NEVER",
    "FGSM",
    "PGD",
    "Attack",
    "AttackBatchResult",
    "AttackParams",
    "FGSMParams",
    "IFGSMParams",
    "IterativeFGSM",
    "PGDParams",
    "available_attacks",
    "evaluation_mode",
    "get_attack",
    "register_attack",
]

"""The attack template, its batch result and the attack registry.

:class:`Attack.__call__` is a template method (STYLE 1): it checks the inputs, keeps the
model in eval mode (restoring its mode afterwards), resolves labels and targets, then runs
the iterative loop of [Stock2018, §2] (``x_{t+1} = step(x_t, grad_x loss(x_t))``) on
the whole batch at once. Subclasses implement one abstract method, :meth:`Attack._step`,
and may override :meth:`Attack._start` (random starts).

The model is never modified: gradients are taken with ``torch.autograd.grad`` with respect
to the input only, so no parameter ``.grad`` is ever written, and through the model's fused
inference copy (:class:`~handlers.models.derived.FusedClassifier`: batch norm folded,
channels-last), the same function at about three quarters of the cost per step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from handlers.deadline import check_time
from handlers.models.derived import fused_classifier, inference_logits
from handlers.models.modes import evaluation_mode
from protocol.params.attacks import AttackParams, CoreSettings
from protocol.validation import InvalidParameter, UnknownMethod, check_class_index

NEVER = -1
"""``steps_to_flip`` value of an image on which the attack never succeeded."""


@dataclass(frozen=True)
class AttackBatchResult:
    """The outcome of one attack on a batch of ``B`` images (all tensors on the CPU).

    Attributes:
        adversarial: ``(B, 3, H, W)`` adversarial images in [0, 1].
        clean_predictions: ``(B,)`` predicted class of each clean image.
        clean_confidence: ``(B,)`` probability of that class.
        predictions: ``(B,)`` predicted class of each adversarial image.
        confidence: ``(B,)`` probability of that class.
        reference: ``(B,)`` the class the attack moves away from (untargeted: the given
            labels, by default the clean predictions) or towards (targeted: the targets).
        reference_confidence: ``(B,)`` probability of ``reference`` on the adversarial
            image (how far a robust image is from flipping; used to rank prototypes).
        targeted: whether ``reference`` holds targets.
        success: ``(B,)`` bool: the final prediction differs from the label (untargeted)
            or equals the target (targeted).
        steps_to_flip: ``(B,)`` int64, the first iteration ``t`` (0..M) at which the
            success criterion held, ``-1`` (:data:`NEVER`) if it never did within ``M``.
            ``0`` means the starting point was already adversarial (e.g. misclassified).
        linf: ``(B,)`` L-inf norm of ``adversarial - clean``.
        l2: ``(B,)`` L2 norm of ``adversarial - clean``.
        steps: ``M``, the number of steps the attack was allowed.
    """

    adversarial: torch.Tensor
    clean_predictions: torch.Tensor
    clean_confidence: torch.Tensor
    predictions: torch.Tensor
    confidence: torch.Tensor
    reference: torch.Tensor
    reference_confidence: torch.Tensor
    targeted: bool
    success: torch.Tensor
    steps_to_flip: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    steps: int

    def steps_to_flip_list(self) -> list[int | None]:
        """``steps_to_flip`` with ``None`` for never (the contract's RobustnessResult form)."""
        return [None if s == NEVER else int(s) for s in self.steps_to_flip.tolist()]

    def record(self, i: int) -> dict[str, Any]:
        """JSON-friendly summary of image ``i`` (everything but the images)."""
        return {
            "clean_prediction": int(self.clean_predictions[i]),
            "clean_confidence": float(self.clean_confidence[i]),
            "prediction": int(self.predictions[i]),
            "confidence": float(self.confidence[i]),
            "success": bool(self.success[i]),
            "steps_to_flip": self.steps_to_flip_list()[i],
            "linf": float(self.linf[i]),
            "l2": float(self.l2[i]),
        }


def concatenate(results: list[AttackBatchResult]) -> AttackBatchResult:
    """One :class:`AttackBatchResult` from the results of consecutive batches."""
    first = results[0]
    tensors = {
        name: torch.cat([getattr(r, name) for r in results])
        for name, value in vars(first).items()
        if isinstance(value, torch.Tensor)
    }
    return AttackBatchResult(**tensors, targeted=first.targeted, steps=first.steps)


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate a non-empty ``(B, 3, H, W)`` float batch in [0, 1]; raise
    :class:`InvalidParameter`."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise InvalidParameter("images", f"expected a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise InvalidParameter("images", f"expected floating point pixels, got {images.dtype}")
    if images.shape[0] == 0:
        raise InvalidParameter("images", "expected at least one image, got an empty batch")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise InvalidParameter("images", "pixels must lie in [0, 1] (the model normalises itself)")
    return images.clone() if images.is_inference() else images.detach()


@dataclass(frozen=True)
class _Goal:
    """What the attack is after: leave ``reference`` (untargeted) or reach it (targeted)."""

    reference: torch.Tensor
    targeted: bool

    def reached(self, logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Per row: has the goal been reached (``reference``: the rows' own classes)?"""
        hit = logits.argmax(dim=1) == reference
        return hit if self.targeted else ~hit

    def loss(self, logits: torch.Tensor, reference: torch.Tensor, moving: torch.Tensor | None) -> torch.Tensor:
        """Sum (not mean) of the per-image losses of the moving images (all if ``None``),
        so each image's gradient is its own."""
        ce = F.cross_entropy(logits, reference, reduction="none")
        ce = (ce if moving is None else ce * moving).sum()
        return -ce if self.targeted else ce


class Attack(ABC):
    """Template of an iterative gradient attack [Stock2018, §2, eqs. 1-2].

    Subclasses set :attr:`params_model` and implement :meth:`_step`.
    """

    name: ClassVar[str] = ""
    params_model: ClassVar[type[AttackParams]]

    def __init__(self, params: Mapping[str, Any] | AttackParams | None = None) -> None:
        from protocol.validation import parse_params

        self.params = parse_params(self.params_model, params)
        self.settings: CoreSettings = self.params.core()

    def __call__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> AttackBatchResult:
        """Attack a batch.

        Args:
            model: a pixel-space classifier (``[0, 1]`` input, normalisation inside).
            images: ``(B, 3, H, W)`` in [0, 1].
            labels: untargeted: the classes to move away from (default: the clean
                predictions, so success means "the prediction changed").
            targets: targeted attack towards these classes (overrides ``params.target_class``).

        Returns:
            The :class:`AttackBatchResult` of the whole batch.
        """
        with evaluation_mode(model):
            x0 = check_images(images).to(device_of(model))
            scorer = _Scorer(model, fused_classifier(model, x0))
            start = self._start(x0)
            logits, leaf = scorer(start, need_grad=self.settings.steps > 0)
            clean_logits = logits.detach() if start is x0 else scorer(x0, False)[0]
            goal = self._goal(clean_logits, labels, targets)
            adversarial, final_logits, steps = self._iterate(scorer, x0, leaf, logits, goal)
        return _summarise(x0, adversarial, clean_logits, final_logits, steps, goal, self.settings)

    def in_batches(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        batch_size: int = 64,
    ) -> AttackBatchResult:
        """The attack on consecutive chunks of at most ``batch_size`` images, concatenated.

        Each image's result does not depend on the others, so this equals one call on the
        whole set (up to floating-point differences between batch sizes).
        """
        parts = []
        for start in range(0, images.shape[0], max(1, batch_size)):
            chunk = slice(start, start + batch_size)
            parts.append(
                self(
                    model,
                    images[chunk],
                    None if labels is None else labels[chunk],
                    None if targets is None else targets[chunk],
                )
            )
        return concatenate(parts)

    def _start(self, images: torch.Tensor) -> torch.Tensor:
        """Starting point of the iteration (default: the clean images themselves)."""
        return images

    @abstractmethod
    def _step(self, x_adv: torch.Tensor, grad: torch.Tensor, x_clean: torch.Tensor) -> torch.Tensor:
        """One update ``x_{t+1}`` from ``x_t`` and ``grad_x loss(x_t)``; stays in [0, 1]."""

    def _goal(
        self, clean_logits: torch.Tensor, labels: torch.Tensor | None, targets: torch.Tensor | None
    ) -> _Goal:
        batch, classes = clean_logits.shape
        if targets is None and self.settings.target_class is not None:
            targets = torch.full((batch,), self.settings.target_class, dtype=torch.long)
        chosen, name = (targets, "target_class") if targets is not None else (labels, "labels")
        if chosen is None:
            return _Goal(clean_logits.argmax(dim=1), targeted=False)
        chosen = torch.as_tensor(chosen, dtype=torch.long).reshape(-1)  # checked where it is
        if chosen.numel() != batch:
            raise InvalidParameter(name, f"expected {batch} class indices, got {chosen.numel()}")
        check_class_index(name, chosen.tolist(), classes)
        return _Goal(chosen.to(clean_logits.device), targeted=targets is not None)

    def _iterate(
        self,
        scorer: _Scorer,
        x0: torch.Tensor,
        x: torch.Tensor,
        logits: torch.Tensor,
        goal: _Goal,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run up to ``M`` steps; images that succeeded stop changing if ``stop_at_flip``.

        On the CPU stopped images leave the batch (less work); on a GPU they stay in it,
        frozen by a mask, so that a step costs one host-device synchronisation only. The
        rows in the batch carry their own reference classes and clean images, and the batch
        is only re-indexed in a step where an image stopped: a step of a batch whose images
        all move indexes nothing (on one 64x64 image the bookkeeping was about a tenth of
        the attack).
        """
        settings = self.settings
        compact = compacts(x0.device) and settings.stop_at_flip
        adversarial, final_logits = x.detach().clone(), logits.detach().clone()
        steps = torch.full((x0.shape[0],), NEVER, dtype=torch.long, device=x0.device)
        rows = torch.arange(x0.shape[0], device=x0.device)
        reference, origin = goal.reference, x0  # those of the rows in the batch
        for t in range(settings.steps + 1):
            check_time("the attack")
            final_logits[rows] = logits.detach()
            hit = goal.reached(logits.detach(), reference)
            if compact:  # every row in the batch has not flipped before
                steps[rows] = torch.where(hit, t, NEVER)
                moving = ~hit
            else:  # the batch is the whole set
                steps = torch.where(hit & (steps == NEVER), t, steps)
                moving = steps == NEVER if settings.stop_at_flip else None
            done = t == settings.steps or (moving is not None and not moving.any())
            if done:
                break
            leaving = compact and not bool(moving.all())
            if leaving:
                rows, logits, reference, origin = rows[moving], logits[moving], reference[moving], origin[moving]
            (grad,) = torch.autograd.grad(goal.loss(logits, reference, None if compact else moving), x)
            x_now = x.detach()
            if leaving:
                grad, x_now = grad[moving], x_now[moving]
            stepped = self._step(x_now, grad, origin)
            if moving is not None and not compact:
                stepped = torch.where(moving.view(-1, *([1] * (x0.dim() - 1))), stepped, x_now)
            adversarial[rows] = stepped
            logits, x = scorer(stepped, need_grad=t + 1 < settings.steps)
        return adversarial, final_logits, steps


def compacts(device: torch.device) -> bool:
    """Whether stopped images leave the batch on ``device`` (the CPU) or stay masked (GPUs)."""
    return device.type == "cpu"


def device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass(frozen=True)
class _Scorer:
    """Logits of iterates: with gradients through ``differentiable``, without through the
    model's inference copy."""

    model: nn.Module
    differentiable: nn.Module

    def __call__(self, x: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``x`` and the leaf they were computed from.

        With ``need_grad`` the leaf is a fresh ``requires_grad`` copy of ``x`` so that
        ``torch.autograd.grad(loss, leaf)`` gives input gradients only (no parameter
        ``.grad``). Without, the logits come from the fused inference copy, as the
        prediction task's do (:func:`~handlers.models.derived.inference_logits`).
        """
        leaf = x.detach()
        if not need_grad:
            return inference_logits(self.model, leaf).clone(), leaf
        leaf = leaf.clone().requires_grad_(True)
        with torch.enable_grad():
            return self.differentiable(leaf), leaf


def _summarise(
    x0: torch.Tensor,
    adversarial: torch.Tensor,
    clean_logits: torch.Tensor,
    final_logits: torch.Tensor,
    steps: torch.Tensor,
    goal: _Goal,
    settings: CoreSettings,
) -> AttackBatchResult:
    clean_p, final_p = clean_logits.softmax(dim=1), final_logits.softmax(dim=1)
    rows = torch.arange(x0.shape[0], device=x0.device)
    delta = (adversarial - x0).flatten(1)
    predictions = final_p.argmax(dim=1)
    return AttackBatchResult(
        adversarial=adversarial.detach().cpu(),
        clean_predictions=clean_p.argmax(dim=1).cpu(),
        clean_confidence=clean_p.max(dim=1).values.cpu(),
        predictions=predictions.cpu(),
        confidence=final_p.max(dim=1).values.cpu(),
        reference=goal.reference.cpu(),
        reference_confidence=final_p[rows, goal.reference].cpu(),
        targeted=goal.targeted,
        success=goal.reached(final_logits, goal.reference).cpu(),
        steps_to_flip=steps.cpu(),
        linf=delta.abs().amax(dim=1).cpu(),
        l2=delta.norm(dim=1).cpu(),
        steps=settings.steps,
    )


# --------------------------------------------------------------------------- registry
A = TypeVar("A", bound=type[Attack])
_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(name: str, *aliases: str) -> Callable[[A], A]:
    """Class decorator: make an :class:`Attack` available as ``get_attack(name)``."""

    def decorate(cls: A) -> A:
        cls.name = name
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise ValueError(f"attack {key!r} is already registered")
            _REGISTRY[key] = cls
        return cls

    return decorate


def get_attack(name: str, params: Mapping[str, Any] | AttackParams | None = None) -> Attack:
    """Instantiate the attack registered as ``name`` with validated ``params``.

    Raises:
        UnknownMethod: ``name`` is not registered.
        InvalidParameter: a parameter value is rejected.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownMethod("attack", name, list(_REGISTRY)) from None
    return cls(params)


def available_attacks() -> list[str]:
    """Canonical names of the registered attacks (aliases left out)."""
    return sorted({cls.name for cls in _REGISTRY.values()})

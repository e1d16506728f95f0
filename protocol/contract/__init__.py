"""The gateway <-> TorchServe handler contract, version 1 (torch-free, pydantic only).

One JSON body per TorchServe request: ``{"task": ..., ...}``. The handler parses it with
:data:`TaskRequest` (a discriminated union on ``task``) and answers with the matching
``*Result`` model, or with :class:`ErrorBody` and a 4xx status. The gateway and the RQ
workers import this package to build requests and validate replies; nothing here imports
torch, so importing it costs only pydantic.

Each task is one module here declaring its request and result models and registering them
(:mod:`protocol.contract.registry`); every module of this package is imported, and
:data:`TaskRequest` is built from that registry, so it holds every task module there is.
The names below are re-exported for the callers' convenience. What the tasks share is in :mod:`protocol.contract.parts`.

Images travel either as base64 of canonical RGB PNG bytes inside the JSON, or as
:class:`RawImage` references to decoded RGB8 pixels that follow the JSON in one binary
frame (:mod:`protocol.frames`; what the gateway sends, which has validated and decoded the
upload already). Arrays travel as :class:`EncodedArray` (base64 ``.npy``, float32).
"""

from pydantic import BaseModel

from protocol.contract.apem import ApemRequest, ApemResult
from protocol.contract.apem_set import ApemSetRequest, ApemSetResult
from protocol.contract.attack import AttackRequest, AttackResult
from protocol.contract.class_features import ClassFeaturesRequest, ClassFeaturesResult
from protocol.contract.describe import DescribeRequest, DescribeResult
from protocol.contract.embed import EmbedRequest, EmbedResult
from protocol.contract.explain import ExplainOptions, ExplainRequest, ExplainResult
from protocol.contract.filter import FilterRequest, FilterResult
from protocol.contract.mask_sensitivity import MaskSensitivityRequest, MaskSensitivityResult
from protocol.contract.noise_sensitivity import NoiseSensitivityRequest, NoiseSensitivityResult
from protocol.contract.parts import (
    CONTRACT_VERSION,
    TIME_LIMIT_HEADER,
    ApemScore,
    ClassScore,
    EncodedArray,
    ErrorBody,
    ErrorDetail,
    ImageData,
    ImageOutput,
    RawImage,
    Stage,
    StampedResult,
    Strict,
)
from protocol.contract.predict import PredictRequest, PredictResult
from protocol.contract.registry import TASKS, TaskContract, register_task, task_union
from protocol.contract.robustness import RobustnessRequest, RobustnessResult
from protocol.contract.sufficient_subsets import SufficientSubsetsRequest, SufficientSubsetsResult
from protocol.discovery import import_submodules

import_submodules(__name__, __path__)  # registers a task module that is not re-exported above

TaskRequest = task_union()
"""Any registered task's request, discriminated on ``task`` (validate with a ``TypeAdapter``)."""

__all__ = [
    "CONTRACT_VERSION",
    "TASKS",
    "TIME_LIMIT_HEADER",
    "ApemRequest",
    "ApemResult",
    "ApemScore",
    "ApemSetRequest",
    "ApemSetResult",
    "AttackRequest",
    "AttackResult",
    "BaseModel",
    "ClassFeaturesRequest",
    "ClassFeaturesResult",
    "ClassScore",
    "DescribeRequest",
    "DescribeResult",
    "EmbedRequest",
    "EmbedResult",
    "EncodedArray",
    "ErrorBody",
    "ErrorDetail",
    "ExplainOptions",
    "ExplainRequest",
    "ExplainResult",
    "FilterRequest",
    "FilterResult",
    "ImageData",
    "ImageOutput",
    "MaskSensitivityRequest",
    "MaskSensitivityResult",
    "NoiseSensitivityRequest",
    "NoiseSensitivityResult",
    "PredictRequest",
    "PredictResult",
    "RawImage",
    "RobustnessRequest",
    "RobustnessResult",
    "Stage",
    "StampedResult",
    "Strict",
    "SufficientSubsetsRequest",
    "SufficientSubsetsResult",
    "TaskContract",
    "TaskRequest",
    "register_task",
]

"""HTTP request and response models of the gateway (separate models per direction).

The single-image responses are the contract's result models (what the handler sends is
what the client gets; the gateway only puts its own ``elapsed_ms`` in), and so are their
nested parts (class scores, encoded arrays, APEM scores). Each job type's
request and result models live with the job type (:mod:`service.jobs.types`); the job
envelopes (accepted, status) are here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.contract import (
    ApemResult,
    AttackResult,
    ErrorDetail,
    ExplainResult,
    PredictResult,
)

JobState = Literal["queued", "started", "finished", "failed", "canceled"]


class ResponseModel(BaseModel):
    """Base of the response models (a field may be called ``model``)."""

    model_config = ConfigDict(protected_namespaces=())


class RequestModel(BaseModel):
    """Base of the JSON request models: an unknown field is refused (422), so that a
    misspelt option does not silently take its default."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --------------------------------------------------------------------------- health
class HealthResponse(ResponseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(ResponseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="component -> 'ok' or why it is down")
    error: ErrorDetail | None = None


# --------------------------------------------------------------------------- models
class ModelInfo(ResponseModel):
    name: str
    version: str
    num_classes: int
    input_size: int
    architecture: str | None = None
    description: str = ""
    explainers: list[str] = Field(default_factory=list)
    attacks: list[str] = Field(default_factory=list)


class ModelDetail(ModelInfo):
    labels: list[str]
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)


class ModelList(ResponseModel):
    models: list[ModelInfo]


# --------------------------------------------------------------------------- single image
# The model server's result models are the public ones: the gateway parses TorchServe's
# reply into them and only replaces ``elapsed_ms`` with what it measured itself (the whole
# request: upload, decoding, the model server's work).
class PredictResponse(PredictResult):
    """The top classes of one image."""


class ExplainResponse(ExplainResult):
    """One image's explanation: its map at the chosen stage, its pictures, and its APEM
    score when asked."""


AttackMethod = Literal["fgsm", "ifgsm", "pgd"]


class AttackResponse(AttackResult):
    """One image's adversarial example.

    ``params`` echoes the attack's parameters under the names the request sends them
    (``epsilon``, ``step_size``, ``steps``, ``norm``, ``target_class``, ...), the method's
    defaults filled in; it used to say ``eps`` and ``target`` where the request said
    ``epsilon`` and ``target_class``.
    """


class ApemResponse(ApemResult):
    """The APEM score of one image's explanation or of an uploaded map."""


# --------------------------------------------------------------------------- datasets
class SkippedFile(ResponseModel):
    file: str
    reason: str


class DatasetResponse(ResponseModel):
    dataset_id: str
    classes: dict[str, int]
    n_images: int
    skipped: list[SkippedFile] = Field(default_factory=list)
    has_metadata: bool = False
    masks: dict[str, int] = Field(
        default_factory=dict, description="images with a core / spurious region mask (_masks/<kind>/...)"
    )
    created_at: datetime | None = None


class DeletedResponse(ResponseModel):
    deleted: str


# --------------------------------------------------------------------------- jobs
class JobAccepted(ResponseModel):
    job_id: str
    status_url: str


class JobStatusResponse(ResponseModel):
    job_id: str
    type: str
    status: JobState
    progress: float = Field(ge=0, le=1)
    error: str | None = None
    created_at: datetime | None = None
    ended_at: datetime | None = None

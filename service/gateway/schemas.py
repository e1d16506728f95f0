"""HTTP request and response models of the gateway (separate models per direction).

Nested parts shared with TorchServe (class scores, encoded arrays, APEM scores) are the
contract's own models, so what the handler sends is what the client gets. Each job type's
request and result models live with the job type (:mod:`service.jobs.types`); the job
envelopes (accepted, status) are here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.contract import ApemScore, ClassScore, EncodedArray, ErrorDetail

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
class PredictResponse(ResponseModel):
    model: str
    version: str
    predictions: list[ClassScore]
    elapsed_ms: float


class Explanation(ResponseModel):
    method: str
    params: dict[str, Any]
    target: int
    stage: int
    prediction: ClassScore
    relevance: EncodedArray | None = None
    heatmap_png: str | None = None
    overlay_png: str | None = None
    attention_png: str | None = Field(
        None, description="LIME: the top superpixels shown; SIS: the sufficient subset shown"
    )
    path_png: str | None = Field(None, description="LIME: superpixels added one by one")
    extras: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's own numbers (LIME segments, weights and fit score; IG's "
        "completeness gap; LRP's logit and relevance sums; NAM's feature; SmoothGrad's noise; SIS's subset "
        "size, its confidence and the confidence with only keep_fraction of the pixels)",
    )


class ExplainResponse(Explanation):
    model: str
    version: str
    apem: ApemScore | None = None
    elapsed_ms: float


AttackMethod = Literal["fgsm", "ifgsm", "pgd"]


class AttackResponse(ResponseModel):
    """One image's adversarial example.

    ``params`` echoes the attack's parameters under the names the request sends them
    (``epsilon``, ``step_size``, ``steps``, ``norm``, ``target_class``, ...), the method's
    defaults filled in; it used to say ``eps`` and ``target`` where the request said
    ``epsilon`` and ``target_class``.
    """

    model: str
    version: str
    method: str
    params: dict[str, Any]
    original: ClassScore
    adversarial: ClassScore
    success: bool
    steps_to_flip: int | None
    linf: float
    l2: float
    adversarial_png: str
    png_prediction: ClassScore = Field(
        description="prediction of adversarial_png as delivered (8 bits per channel): what "
        "uploading it again gives; steps below half a level are partly lost in it"
    )
    perturbation_png: str
    adversarial_array: EncodedArray | None = Field(
        None, description="the exact adversarial image, float32 (3, H, W) in [0, 1], when asked"
    )
    explanation: Explanation | None = Field(
        None, description="the adversarial image explained [Stock2018, fig. 5], when asked"
    )
    elapsed_ms: float


class ApemResponse(ResponseModel):
    model: str
    version: str
    method: str | None
    method_params: dict[str, Any] = Field(
        default_factory=dict, description="the explainer's parameters (none for an uploaded map)"
    )
    target: int
    eps_minus: float | None
    eps_plus: float | None
    apem: float | None
    apem_norm: float | None
    grid: dict[str, Any]
    approximate: bool = False
    params: dict[str, Any] = Field(description="APEM parameters used, defaults filled in")
    elapsed_ms: float


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

"""HTTP request and response models of the gateway (separate models per direction).

Nested parts shared with TorchServe (class scores, encoded arrays, APEM scores) are the
contract's own models, so what the handler sends is what the client gets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.contract import ApemScore, ClassScore, EncodedArray, ErrorDetail, FilterResult

JobState = Literal["queued", "started", "finished", "failed", "canceled"]


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --------------------------------------------------------------------------- health
class HealthResponse(_Out):
    status: Literal["ok"] = "ok"


class ReadyResponse(_Out):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="component -> 'ok' or why it is down")
    error: ErrorDetail | None = None


# --------------------------------------------------------------------------- models
class ModelInfo(_Out):
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


class ModelList(_Out):
    models: list[ModelInfo]


# --------------------------------------------------------------------------- single image
class PredictResponse(_Out):
    model: str
    version: str
    predictions: list[ClassScore]
    elapsed_ms: float


class Explanation(_Out):
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


class AttackParams(_In):
    """Parameters of the FGSM / I-FGSM / PGD family (pixels in [0, 1]).

    Every field is optional: what the client leaves out takes the method's own default
    (I-FGSM: paper 000's step 0.001 x 10 steps, no projection; FGSM: one step of 0.01;
    PGD: 8/255 ball, 2/255 steps, 10 steps, random start with seed 0), and the response's
    ``params`` says which values were used. FGSM takes no ``steps``/``step_size``; only PGD
    takes ``random_start`` and ``seed``.
    """

    epsilon: float | None = Field(None, gt=0, description="budget: FGSM step, PGD/I-FGSM ball radius")
    step_size: float | None = Field(None, gt=0, le=1)
    steps: int | None = Field(None, ge=1, le=1000)
    norm: Literal["linf", "l2"] | None = None
    target_class: int | None = Field(None, ge=0)
    stop_at_flip: bool | None = Field(
        None, description="freeze an image once it flipped (default); false: take every step"
    )
    random_start: bool | None = Field(None, description="PGD only: start at a random point")
    seed: int | None = Field(None, ge=0, description="PGD only: seed of the random start")

    @model_validator(mode="after")
    def _linf_sizes_within_pixel_range(self) -> AttackParams:
        if self.norm in (None, "linf") and self.epsilon is not None and self.epsilon > 1:
            raise ValueError("an L-inf epsilon in [0, 1] pixel units is at most 1")
        return self


AttackMethod = Literal["fgsm", "ifgsm", "pgd"]


class AttackResponse(_Out):
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
        None, description="the adversarial image explained (paper 000, figure 5), when asked"
    )
    elapsed_ms: float


class ApemResponse(_Out):
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
class SkippedFile(_Out):
    file: str
    reason: str


class DatasetResponse(_Out):
    dataset_id: str
    classes: dict[str, int]
    n_images: int
    skipped: list[SkippedFile] = Field(default_factory=list)
    has_metadata: bool = False
    masks: dict[str, int] = Field(
        default_factory=dict, description="images with a core / spurious region mask (_masks/<kind>/...)"
    )
    created_at: datetime | None = None


class DeletedResponse(_Out):
    deleted: str


# --------------------------------------------------------------------------- jobs
class CriticismJobRequest(_In):
    type: Literal["criticism"]
    model: str
    dataset_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    class_name: str = Field(min_length=1, max_length=200)
    method: Literal["adversarial", "mmd", "probs", "random"]
    m: int = Field(5, ge=1, le=1000)
    params: dict[str, Any] = Field(default_factory=dict)


class FilterJobRequest(_In):
    type: Literal["filter"]
    model: str
    method: str = Field(min_length=1, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)
    image: str = Field(description="base64 of an image file (any accepted format)")
    target: int | None = Field(None, ge=0)
    apem_params: dict[str, Any] = Field(
        default_factory=dict, description="APEM grid and search (step, max_steps, search, ...)"
    )
    filter_params: dict[str, Any] = Field(
        default_factory=dict, description="levels (default 256), candidates per batch"
    )


class ApemJobRequest(_In):
    """APEM of one explanation method over a dataset (thesis 003, chapter 3) and its
    Spearman correlation with the loss (section 5.4)."""

    type: Literal["apem"]
    model: str
    dataset_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    class_name: str | None = Field(
        None, min_length=1, max_length=200, description="one class; default: every class"
    )
    method: str = Field(min_length=1, max_length=100, description="explanation method")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    apem_params: dict[str, Any] = Field(
        default_factory=dict,
        description="APEM grid and search (step, max_steps, search, normalise, shuffles, ...)",
    )
    max_images: int = Field(
        500, ge=3, le=20000, description="score a seeded random sample of at most this many"
    )
    seed: int = Field(0, ge=0, description="seed of that sample")


class AuditJobRequest(_In):
    """Spurious-feature audit (paper 002, sections 3.2 and 5): each class's most important
    penultimate-layer features, their activation maps, and the accuracy left when their
    regions are corrupted by Gaussian noise."""

    type: Literal["audit"]
    model: str
    dataset_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    class_name: str | None = Field(
        None, min_length=1, max_length=200, description="one class; default: every class"
    )
    top_k: int = Field(5, ge=1, le=20, description="features audited per class, by importance")
    sigmas: list[Annotated[float, Field(gt=0, le=4)]] = Field(
        default_factory=lambda: [0.1, 0.25, 0.5],
        min_length=1,
        max_length=8,
        description="noise levels (standard deviations, pixels in [0, 1]), equation 1",
    )
    groups: dict[
        Annotated[str, Field(min_length=1, max_length=50)],
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=512)],
    ] = Field(
        default_factory=dict,
        max_length=8,
        description="named feature lists corrupted together (equation 2); `spurious` and `core` "
        "give core and spurious accuracy (definition 2); needs class_name",
    )
    gallery_images: int = Field(5, ge=0, le=20, description="most activating images shown per feature")
    max_images: int = Field(200, ge=1, le=5000, description="seeded sample per class")
    seed: int = Field(0, ge=0, description="seed of the sample and of the noise")


class EvaluateJobRequest(_In):
    """Top-1 and top-k error over a dataset, rectified by the human votes in its metadata
    (paper 000, section 3.1: a prediction 4 of 5 raters find relevant counts as correct)."""

    type: Literal["evaluate"]
    model: str
    dataset_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    class_name: str | None = Field(
        None, min_length=1, max_length=200, description="one class; default: every class"
    )
    top_k: int = Field(5, ge=1, le=100)
    agreement: float = Field(
        0.8, gt=0, le=1, description="share of a prediction's raters who must find it relevant"
    )
    review_limit: int = Field(500, ge=0, le=5000, description="most images listed in to_review")
    max_images: int = Field(20000, ge=1, le=20000, description="seeded sample of at most this many")
    seed: int = Field(0, ge=0, description="seed of that sample")


class OverinterpretationJobRequest(_In):
    """Overinterpretation (paper 004): each image's sufficient input subset for its label
    (the ``sis`` explainer), the label's probability with 95 % of the image masked, and
    where the subsets lie on the regions uploaded with the images."""

    type: Literal["overinterpretation"]
    model: str
    dataset_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    class_name: str | None = Field(
        None, min_length=1, max_length=200, description="one class; default: every class"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the sis explainer's parameters (threshold, keep_fraction, step_fraction, mask_value)",
    )
    gallery_images: int = Field(8, ge=0, le=50, description="images with the smallest subsets, shown")
    max_images: int = Field(500, ge=1, le=20000, description="seeded sample of at most this many")
    seed: int = Field(0, ge=0, description="seed of that sample")


JobRequest = Annotated[
    CriticismJobRequest
    | FilterJobRequest
    | ApemJobRequest
    | AuditJobRequest
    | EvaluateJobRequest
    | OverinterpretationJobRequest,
    Field(discriminator="type"),
]


class JobAccepted(_Out):
    job_id: str
    status_url: str


class JobStatusResponse(_Out):
    job_id: str
    type: str
    status: JobState
    progress: float = Field(ge=0, le=1)
    error: str | None = None
    created_at: datetime | None = None
    ended_at: datetime | None = None


class CriticismItem(_Out):
    rank: int
    file: str
    sha256: str
    score: float | None = None


class CriticismResult(_Out):
    type: Literal["criticism"] = "criticism"
    model: str
    version: str
    dataset_id: str
    class_name: str
    method: str
    m: int
    params: dict[str, Any]
    n_candidates: int
    score_name: str
    prototypes: list[CriticismItem]
    criticisms: list[CriticismItem]
    details: dict[str, Any] = Field(default_factory=dict)
    gallery_png: str | None = Field(None, description="base64 PNG: prototypes row, criticisms row")
    elapsed_ms: float


class FilterJobResult(FilterResult):
    """The filter job's result: TorchServe's ``FilterResult`` (thesis 003, Algorithm 2). A
    filter that outlasts one model-server call goes on in the next from the map it reached;
    the counts and ``fraction_kept`` cover all ``calls``, ``apem_before`` is the input map's."""

    type: Literal["filter"] = "filter"
    calls: int = Field(1, description="model-server calls the filter took")


class ApemItem(_Out):
    file: str
    sha256: str
    class_name: str
    label: int = Field(description="the class name's index among the model's labels")
    prediction: int = Field(description="the predicted class, which the method explained")
    eps_minus: float | None
    eps_plus: float | None
    apem: float
    apem_norm: float | None = None
    loss: float = Field(description="cross-entropy of the clean image against its label")


class ApemJobResult(_Out):
    type: Literal["apem"] = "apem"
    model: str
    version: str
    dataset_id: str
    class_name: str | None
    method: str
    method_params: dict[str, Any]
    params: dict[str, Any] = Field(description="APEM parameters, defaults filled in")
    grid: dict[str, Any]
    approximate: bool
    max_images: int
    seed: int
    n_candidates: int = Field(description="images in scope before sampling")
    n_scored: int
    accuracy: float
    apem: float = Field(description="mean of eps+ - eps- over the scored images")
    apem_norm: float | None = None
    spearman: dict[str, Any] | None = Field(
        None, description="rho, p_value, n of APEM against the loss; none for < 3 images"
    )
    items: list[ApemItem]
    elapsed_ms: float


class NoiseAccuracy(_Out):
    sigma: float
    accuracy: float = Field(description="accuracy with the region corrupted at this level")
    drop: float = Field(description="clean accuracy minus that accuracy")


class ActivatingImage(_Out):
    file: str
    sha256: str
    value: float = Field(description="the feature's value (mean activation) on the image")
    overlay_png: str | None = Field(None, description="base64 PNG: the feature's map over the image")


class AuditedFeature(_Out):
    feature: int = Field(description="channel of the last convolutional feature map")
    rank: int = Field(description="rank by mean importance for the class (paper 002, section 3.2)")
    importance: float = Field(description="mean of value x d logit / d value over the class")
    value: float
    coverage: float = Field(description="mean of its activation map: the share of the image corrupted")
    noise: list[NoiseAccuracy]
    top_images: list[ActivatingImage]


class AuditedGroup(_Out):
    name: str
    features: list[int]
    noise: list[NoiseAccuracy]


class AnnotatedRegion(_Out):
    kind: Literal["core", "spurious"]
    n_images: int = Field(description="images of the class uploaded with this kind of mask")
    accuracy: float = Field(description="clean accuracy on those images")
    coverage: float = Field(description="mean of the masks as the model sees them")
    noise: list[NoiseAccuracy]


class AuditedClass(_Out):
    class_name: str
    label: int
    n_images: int
    accuracy: float = Field(description="clean accuracy on the audited images")
    features: list[AuditedFeature]
    groups: list[AuditedGroup]
    core_accuracy: list[NoiseAccuracy] | None = Field(None, description="the `spurious` group corrupted")
    spurious_accuracy: list[NoiseAccuracy] | None = Field(None, description="the `core` group corrupted")
    annotated: list[AnnotatedRegion] = Field(default_factory=list, description="uploaded masks corrupted")
    annotated_core_accuracy: list[NoiseAccuracy] | None = Field(
        None, description="the uploaded spurious masks corrupted (definition 2)"
    )
    annotated_spurious_accuracy: list[NoiseAccuracy] | None = Field(
        None, description="the uploaded core masks corrupted"
    )


class AuditJobResult(_Out):
    type: Literal["audit"] = "audit"
    model: str
    version: str
    dataset_id: str
    class_name: str | None
    sigmas: list[float]
    top_k: int
    gallery_images: int
    groups: dict[str, list[int]]
    max_images: int
    seed: int
    classes: list[AuditedClass]
    elapsed_ms: float


class ClassAccuracy(_Out):
    class_name: str
    label: int
    n: int
    top1_accuracy: float
    topk_accuracy: float


class Confusion(_Out):
    class_name: str = Field(description="the true class")
    predicted: str
    count: int


class RectifiedErrors(_Out):
    agreement: float
    top1_error: float = Field(description="misclassified unless the predicted class has the votes")
    topk_error: float = Field(description="label not in the top k unless one of them has the votes")
    misclassified_with_votes: int = Field(description="misclassified images whose prediction was judged")


class ReviewPrediction(_Out):
    class_name: str
    probability: float


class ReviewItem(_Out):
    file: str
    sha256: str
    class_name: str
    predictions: list[ReviewPrediction] = Field(description="the top k, most probable first")


class EvaluateJobResult(_Out):
    type: Literal["evaluate"] = "evaluate"
    model: str
    version: str
    dataset_id: str
    class_name: str | None
    agreement: float
    review_limit: int
    max_images: int
    seed: int
    n_candidates: int
    n_images: int
    top_k: int
    top1_error: float
    topk_error: float
    per_class: list[ClassAccuracy]
    confusions: list[Confusion] = Field(description="the 20 most frequent (true, predicted) pairs")
    rectified: RectifiedErrors | None = Field(None, description="none without votes in the metadata")
    n_misclassified: int
    to_review: list[ReviewItem] = Field(
        description="misclassified images with no votes for their prediction (at most review_limit)"
    )
    elapsed_ms: float


class RegionShare(_Out):
    n_images: int = Field(description="images uploaded with this kind of mask (and a subset)")
    subset_share: float = Field(description="mean share of the subsets' pixels on the region")
    coverage: float = Field(description="mean share of the images the region covers")


class SubsetSummary(_Out):
    n_images: int
    accuracy: float = Field(description="predictions of the whole images")
    confident_when_kept: float = Field(
        description="share of images whose label keeps the threshold with only keep_fraction shown"
    )
    median_kept_confidence: float
    with_subset: float = Field(description="share of images with a sufficient subset at all")
    median_subset: float | None = Field(description="median subset size, share of the image")
    regions: dict[str, RegionShare] = Field(default_factory=dict)


class ClassSubsets(SubsetSummary):
    class_name: str


class SubsetImage(_Out):
    file: str
    sha256: str
    class_name: str
    sis_fraction: float
    sis_confidence: float
    subset_png: str | None = Field(description="base64 PNG: the subset's pixels alone, on black")


class SubsetItem(_Out):
    file: str
    sha256: str
    class_name: str
    label: int
    prediction: int
    sis_fraction: float | None
    sis_confidence: float | None
    kept_fraction: float
    kept_confidence: float
    kept_prediction: int
    confident_when_kept: bool
    region_share: dict[str, float | None]
    region_coverage: dict[str, float]


class OverinterpretationJobResult(SubsetSummary):
    type: Literal["overinterpretation"] = "overinterpretation"
    model: str
    version: str
    dataset_id: str
    class_name: str | None
    params: dict[str, Any] = Field(description="the sis explainer's parameters, defaults filled in")
    max_images: int
    seed: int
    gallery_images: int
    n_candidates: int
    kept_fraction: float
    per_class: list[ClassSubsets]
    gallery: list[SubsetImage]
    items: list[SubsetItem]
    elapsed_ms: float


JobResult = Annotated[
    CriticismResult
    | FilterJobResult
    | ApemJobResult
    | AuditJobResult
    | EvaluateJobResult
    | OverinterpretationJobResult,
    Field(discriminator="type"),
]

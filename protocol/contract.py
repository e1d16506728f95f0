"""The gateway <-> TorchServe handler contract, version 1 (torch-free, pydantic only).

One JSON body per TorchServe request: ``{"task": ..., ...}``. The handler parses it with
:data:`TaskRequest` (a discriminated union on ``task``) and answers with the matching
``*Result`` model, or with :class:`ErrorBody` and a 4xx status. The gateway and the RQ
workers import this module to build requests and validate replies; nothing here imports
torch, so importing it costs only pydantic.

Images travel either as base64 of canonical RGB PNG bytes inside the JSON, or as
:class:`RawImage` references to decoded RGB8 pixels that follow the JSON in one binary
frame (:mod:`protocol.frames`; what the gateway sends, which has validated and decoded the
upload already). Arrays travel as :class:`EncodedArray` (base64 ``.npy``, float32).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTRACT_VERSION = 1

TIME_LIMIT_HEADER = "X-Beyond-Time-Limit"
"""Request header: the seconds the caller waits for this call's answer. The handler stops
the work a little sooner (422 ``time_limit``) rather than compute for nobody."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --------------------------------------------------------------------------- shared parts
class EncodedArray(_Strict):
    """A numpy array as base64 of its ``.npy`` serialisation."""

    encoding: Literal["npy-base64"] = "npy-base64"
    data: str
    shape: list[int]
    dtype: str = "float32"


class RawImage(_Strict):
    """Decoded RGB8 pixels, row-major ``(height, width, 3)``: part ``part`` of a binary frame.

    Only the frame decoder (:func:`protocol.frames.decode_frame`) attaches ``pixels`` (as
    bytes; a JSON string is refused); it is never serialised, so in plain JSON a raw image
    is a reference without data.
    """

    width: int = Field(ge=1)
    height: int = Field(ge=1)
    part: int = Field(0, ge=0)
    pixels: bytes | None = Field(None, exclude=True, repr=False, strict=True)


ImageData = str | RawImage
"""A request image: base64 of an RGB PNG file, or a :class:`RawImage` in a binary frame."""


class ClassScore(_Strict):
    class_index: int
    label: str
    probability: float


class ErrorDetail(_Strict):
    code: str
    message: str


class ErrorBody(_Strict):
    """What the handler returns, with a 4xx/5xx status, when a request cannot be served."""

    error: ErrorDetail


Stage = Literal[1, 2, 3]
"""Visualization stage (thesis 003, section 4.2): 1 raw 3-channel relevance, 2 absolute
value clamped at the 99th percentile and summed over channels, 3 stage 2 times the image."""

ImageOutput = Literal["relevance", "heatmap_png", "overlay_png", "attention_png", "path_png"]


# --------------------------------------------------------------------------- requests
class DescribeRequest(_Strict):
    task: Literal["describe"] = "describe"


class PredictRequest(_Strict):
    task: Literal["predict"] = "predict"
    image: ImageData
    top_k: int = Field(5, ge=1)


class ExplainOptions(_Strict):
    """What to explain and how, apart from the image (an explain request, or the
    explanation an attack request asks for of its adversarial image)."""

    method: str
    target: int | None = Field(None, description="class to explain; default: the predicted class")
    params: dict[str, Any] = Field(default_factory=dict)
    stage: Stage = 2
    colormap: str = "inferno"
    outputs: list[ImageOutput] = Field(
        default_factory=lambda: ["relevance", "heatmap_png", "overlay_png"]
    )
    score: Literal["apem"] | None = None
    apem_params: dict[str, Any] = Field(default_factory=dict)


class ExplainRequest(ExplainOptions):
    task: Literal["explain"] = "explain"
    image: ImageData


class AttackRequest(_Strict):
    task: Literal["attack"] = "attack"
    image: ImageData
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    explanation: ExplainOptions | None = Field(
        None,
        description="also explain the adversarial image (paper 000, figure 5); the default "
        "target is its adversarial class",
    )
    adversarial_array: bool = Field(
        False, description="also return the adversarial image as float32 (the PNG has 8 bits)"
    )


class ApemRequest(_Strict):
    task: Literal["apem"] = "apem"
    image: ImageData
    method: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    relevance: EncodedArray | None = None
    target: int | None = None
    apem_params: dict[str, Any] = Field(default_factory=dict)


class ApemSetRequest(_Strict):
    """APEM of each image's explanation of its predicted class (thesis 003, chapter 3),
    with each image's loss for the rank correlation over a set (section 5.4)."""

    task: Literal["apem_set"] = "apem_set"
    images: list[ImageData] = Field(min_length=1)
    labels: list[int] | None = Field(
        None, description="ground truth of each image's loss; default: its prediction"
    )
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    apem_params: dict[str, Any] = Field(default_factory=dict)


class EmbedRequest(_Strict):
    """Penultimate-layer embeddings and class probabilities for a batch of images."""

    task: Literal["embed"] = "embed"
    images: list[ImageData] = Field(min_length=1)


class RobustnessRequest(_Strict):
    """Steps to flip under an iterative attack, per image (adversarial model criticism)."""

    task: Literal["robustness"] = "robustness"
    images: list[ImageData] = Field(min_length=1)
    method: str = "ifgsm"
    params: dict[str, Any] = Field(default_factory=dict)


class FilterRequest(_Strict):
    """Explanation Filter (thesis 003, Algorithm 2) on one image's explanation, or on a given
    [0, 1] map: the filter job resumes a filter that ran out of time with the map it reached
    (``stop="time_limit"``) and the same ``target``."""

    task: Literal["filter"] = "filter"
    image: ImageData
    method: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    relevance: EncodedArray | None = None
    target: int | None = None
    apem_params: dict[str, Any] = Field(default_factory=dict)
    filter_params: dict[str, Any] = Field(
        default_factory=dict,
        description="FilterParams; `levels` defaults to 256 (the map as an 8-bit heatmap)",
    )


class ClassFeaturesRequest(_Strict):
    """Each image's penultimate-layer features and their importance for its label
    (paper 002, section 3.2); a caller averages them over a class to rank its features."""

    task: Literal["class_features"] = "class_features"
    images: list[ImageData] = Field(min_length=1)
    labels: list[int] = Field(min_length=1)


class NoiseSensitivityRequest(_Strict):
    """Predictions with the regions of neural features corrupted by Gaussian noise
    (paper 002, section 5, equations 1 and 2): each feature alone, each group's union."""

    task: Literal["noise_sensitivity"] = "noise_sensitivity"
    images: list[ImageData] = Field(min_length=1)
    seeds: list[int] = Field(description="one noise seed per image")
    features: list[int] = Field(default_factory=list)
    groups: list[list[int]] = Field(default_factory=list)
    sigmas: list[float] = Field(min_length=1)


class MaskSensitivityRequest(_Strict):
    """Predictions with annotated regions (one soft mask image per image, its grey level
    the mask) corrupted by Gaussian noise (paper 002, section 5, definition 2)."""

    task: Literal["mask_sensitivity"] = "mask_sensitivity"
    images: list[ImageData] = Field(min_length=1)
    masks: list[ImageData] = Field(min_length=1)
    seeds: list[int]
    sigmas: list[float] = Field(min_length=1)


class SufficientSubsetsRequest(_Strict):
    """Each image's sufficient input subset for its label (paper 004, the ``sis``
    explainer) and, where region masks come with the images, the subsets' share on them."""

    task: Literal["sufficient_subsets"] = "sufficient_subsets"
    images: list[ImageData] = Field(min_length=1)
    labels: list[int] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict, description="the sis explainer's parameters")
    regions: dict[str, list[ImageData]] = Field(
        default_factory=dict, description="name -> one mask image per image (grey level = mask)"
    )


TaskRequest = Annotated[
    DescribeRequest
    | PredictRequest
    | ExplainRequest
    | AttackRequest
    | ApemRequest
    | ApemSetRequest
    | EmbedRequest
    | RobustnessRequest
    | FilterRequest
    | ClassFeaturesRequest
    | NoiseSensitivityRequest
    | MaskSensitivityRequest
    | SufficientSubsetsRequest,
    Field(discriminator="task"),
]


# --------------------------------------------------------------------------- results
class _Result(_Strict):
    model: str
    version: str
    elapsed_ms: float


class PredictResult(_Result):
    predictions: list[ClassScore]


class ApemScore(_Strict):
    eps_minus: float | None
    eps_plus: float | None
    apem: float | None
    apem_norm: float | None = None
    grid: dict[str, Any]
    approximate: bool = False
    params: dict[str, Any] = Field(default_factory=dict)


class ExplainResult(_Result):
    method: str
    params: dict[str, Any]
    target: int
    stage: Stage
    prediction: ClassScore
    relevance: EncodedArray | None = None
    heatmap_png: str | None = None
    overlay_png: str | None = None
    attention_png: str | None = None
    path_png: str | None = None
    extras: dict[str, Any] = Field(default_factory=dict)
    apem: ApemScore | None = None


class AttackResult(_Result):
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
        description="prediction of adversarial_png as delivered (rounded to 8 bits per channel)"
    )
    perturbation_png: str
    adversarial_array: EncodedArray | None = None
    explanation: ExplainResult | None = None


class ApemResult(_Result, ApemScore):
    method: str | None = None
    method_params: dict[str, Any] = Field(
        default_factory=dict, description="the explainer's parameters (none for a given map)"
    )
    target: int


class ApemSetResult(_Result):
    """Per image, in request order (``None``: a size not found on the grid)."""

    method: str
    method_params: dict[str, Any]
    params: dict[str, Any] = Field(description="APEM parameters, defaults filled in")
    grid: dict[str, Any]
    approximate: bool
    targets: list[int] = Field(description="the explained class: the prediction")
    eps_minus: list[float | None]
    eps_plus: list[float | None]
    apem: list[float] = Field(description="eps+ - eps-, caps substituted")
    apem_norm: list[float] | None = None
    losses: list[float] = Field(description="cross-entropy against the labels")


class EmbedResult(_Result):
    embeddings: EncodedArray
    probabilities: EncodedArray


class RobustnessResult(_Result):
    method: str
    params: dict[str, Any]
    steps_to_flip: list[int | None]
    predictions: list[int]
    adversarial_predictions: list[int]
    robustness: list[float] = Field(
        default_factory=list,
        description="probability of the clean prediction after the attack (ranks prototypes)",
    )


class ClassFeaturesResult(_Result):
    importance: EncodedArray = Field(description="(N, C) each feature's importance for the label")
    values: EncodedArray = Field(description="(N, C) the features' values (mean activations)")
    predictions: list[int]


class NoiseSensitivityResult(_Result):
    sigmas: list[float]
    clean: list[int] = Field(description="predictions of the clean images")
    features: list[list[list[int]]] = Field(description="[feature][sigma][image] predictions")
    groups: list[list[list[int]]] = Field(description="[group][sigma][image] predictions")
    coverage: list[list[float]] = Field(description="[feature][image] mean of the feature's mask")


class MaskSensitivityResult(_Result):
    sigmas: list[float]
    clean: list[int] = Field(description="predictions of the clean images")
    predictions: list[list[int]] = Field(description="[sigma][image] with the masked region corrupted")
    coverage: list[float] = Field(description="[image] mean of the mask, as the model sees it")


class SufficientSubsetsResult(_Result):
    params: dict[str, Any] = Field(description="the sis explainer's parameters, defaults filled in")
    predictions: list[int] = Field(description="the model's predictions of the whole images")
    sis_fraction: list[float | None] = Field(description="the subset's share of the image; None: none")
    sis_confidence: list[float | None]
    kept_fraction: float = Field(description="share of the pixels kept for the masked check")
    kept_confidence: list[float] = Field(description="the label's probability with only those kept")
    kept_prediction: list[int]
    confident_when_kept: list[bool]
    region_share: dict[str, list[float | None]] = Field(
        default_factory=dict, description="name -> [image] the region's share of the subset"
    )
    region_coverage: dict[str, list[float]] = Field(
        default_factory=dict, description="name -> [image] the region's share of the image"
    )


class FilterResult(_Result):
    method: str | None
    params: dict[str, Any]
    target: int
    filtered: EncodedArray
    heatmap_png: str | None = Field(None, description="the filtered map, colormapped")
    overlay_png: str | None = Field(None, description="the filtered map over the image")
    apem_before: float | None
    apem_after: float | None
    fraction_kept: float
    values_removed: int = 0
    candidates_scored: int = 0
    stop: str = Field("", description="apem_dropped, map_exhausted, or time_limit: the call ran out of time and `filtered` is where Algorithm 2 had got to")
    approximate: bool = False
    distinct_values: int = 0
    filter_params: dict[str, Any] = Field(default_factory=dict)


class DescribeResult(_Strict):
    spec: dict[str, Any]
    tasks: list[str]
    explainers: list[str]
    attacks: list[str]
    contract_version: int = CONTRACT_VERSION

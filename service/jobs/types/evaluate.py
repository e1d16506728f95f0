"""The ``evaluate`` job: top-1 and top-k error over a dataset, rectified by the human votes in
its metadata ([Stock2018, §3.1]: a prediction 4 of 5 raters find relevant counts as
correct).

Each chunk's class probabilities come from TorchServe (``embed``); the errors, confusions
and the images to review are counted over every image, in the reduce. The library:
:mod:`service.jobs.evaluation`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from protocol.contract import DescribeResult
from service.datasets import DatasetStore
from service.errors import ApiError
from service.gateway.forms import check_task
from service.gateway.schemas import RequestModel, ResponseModel
from service.jobs.common import (
    ClassScope,
    DatasetId,
    Image,
    Manifest,
    check_dataset,
    check_labels,
    dataset_result,
    fail,
    in_scope,
    labels_of,
    sampled,
    sampling,
)
from service.jobs.evaluation import probabilities, read_votes, summarise
from service.jobs.fanout import DatasetJob, Part, Run, calls
from service.jobs.registry import Spec, register
from service.settings import Settings


class EvaluateJobRequest(RequestModel):
    """Top-1 and top-k error over a dataset, rectified by the human votes in its metadata
    ([Stock2018, §3.1]: a prediction 4 of 5 raters find relevant counts as correct)."""

    type: Literal["evaluate"]
    model: str
    dataset_id: DatasetId
    class_name: ClassScope = None
    top_k: int = Field(5, ge=1, le=100)
    agreement: float = Field(
        0.8, gt=0, le=1, description="share of a prediction's raters who must find it relevant"
    )
    review_limit: int = Field(500, ge=0, le=5000, description="most images listed in to_review")
    max_images: int = Field(20000, ge=1, le=20000, description="seeded sample of at most this many")
    seed: int = Field(0, ge=0, description="seed of that sample")


class ClassAccuracy(ResponseModel):
    class_name: str
    label: int
    n: int
    top1_accuracy: float
    topk_accuracy: float


class Confusion(ResponseModel):
    class_name: str = Field(description="the true class")
    predicted: str
    count: int


class RectifiedErrors(ResponseModel):
    agreement: float
    top1_error: float = Field(description="misclassified unless the predicted class has the votes")
    topk_error: float = Field(description="label not in the top k unless one of them has the votes")
    misclassified_with_votes: int = Field(description="misclassified images whose prediction was judged")


class ReviewPrediction(ResponseModel):
    class_name: str
    probability: float


class ReviewItem(ResponseModel):
    file: str
    sha256: str
    class_name: str
    predictions: list[ReviewPrediction] = Field(description="the top k, most probable first")


class EvaluateJobResult(ResponseModel):
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


@register
class Evaluate(DatasetJob[EvaluateJobRequest]):
    request = EvaluateJobRequest
    result = EvaluateJobResult

    async def check(self, body: EvaluateJobRequest, described: DescribeResult, settings: Settings) -> Spec:
        """Also reads the dataset's votes: malformed ones are the client's to fix (422)."""
        check_task(described, "embed")
        check_labels(check_dataset(body.dataset_id, body.class_name, settings), described, "measuring the error")
        manifest = DatasetStore(settings).get(body.dataset_id) or {}
        try:
            read_votes(manifest.get("metadata"))
        except ValueError as exc:
            raise ApiError(422, "invalid_metadata", str(exc)) from None
        return body.model_dump()

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[Image]:
        return sampled(spec, manifest)

    def units(self, spec: Spec, images: list[Image], settings: Settings) -> list[int]:
        return calls(len(images), settings.embed_batch_size)

    def map(self, run: Run, images: list[Image]) -> Part:
        labels_of(run, images)
        probs = probabilities(
            run.client, run.spec["model"], images, run.store.read_image, run.settings.embed_batch_size,
            run.progress, run.settings.embed_concurrency,
        )
        return {"probabilities": probs}

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        model_labels, _ = labels_of(run, run.images)
        try:
            votes = read_votes(run.manifest.get("metadata"))
        except ValueError as exc:
            raise fail(str(exc)) from None
        probs = np.concatenate([part["probabilities"] for part in parts])
        return dataset_result(run, {
            **sampling(run),
            "agreement": float(run.spec["agreement"]),
            "review_limit": int(run.spec["review_limit"]),
            "n_candidates": len(in_scope(run.spec, run.manifest)),
            **summarise(run.images, probs, model_labels, votes, run.spec),
        })

"""The ``apem`` job: APEM of one explanation method over a dataset [doValle2019, ch. 3]
and its Spearman correlation with the loss [doValle2019, §5.4].

Each chunk's images are scored in TorchServe (``apem_set``); the means and the correlation
are over every image, in the reduce. The library: :mod:`service.jobs.reliability`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract import ApemSetResult, DescribeResult
from service.gateway.schemas import RequestModel, ResponseModel
from service.jobs.common import (
    ClassScope,
    DatasetId,
    Image,
    Manifest,
    check_dataset,
    check_explanation,
    check_labels,
    dataset_result,
    in_scope,
    labels_of,
    sampled,
    sampling,
)
from service.jobs.fanout import DatasetJob, Part, Run, calls
from service.jobs.registry import Spec, register
from service.jobs.reliability import IMAGES_PER_CALL, score_images, summarise
from service.settings import Settings


class ApemJobRequest(RequestModel):
    """APEM of one explanation method over a dataset [doValle2019, ch. 3] and its
    Spearman correlation with the loss [doValle2019, §5.4]."""

    type: Literal["apem"]
    model: str
    dataset_id: DatasetId
    class_name: ClassScope = None
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


class ApemItem(ResponseModel):
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


class ApemJobResult(ResponseModel):
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


@register
class Apem(DatasetJob[ApemJobRequest]):
    request = ApemJobRequest
    result = ApemJobResult

    async def check(self, body: ApemJobRequest, described: DescribeResult, settings: Settings) -> Spec:
        check_explanation(described, "apem_set", body.method, body.apem_params)
        check_labels(check_dataset(body.dataset_id, body.class_name, settings), described, "APEM's loss")
        return body.model_dump()

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[Image]:
        return sampled(spec, manifest)

    def units(self, spec: Spec, images: list[Image], settings: Settings) -> list[int]:
        return calls(len(images), IMAGES_PER_CALL)

    def map(self, run: Run, images: list[Image]) -> Part:
        _, labels = labels_of(run, images)
        results = score_images(
            run.client, run.spec, images, labels, run.store.read_image, run.progress, run.settings.embed_concurrency
        )
        return {"results": [result.model_dump(mode="json") for result in results]}

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        _, labels = labels_of(run, run.images)
        results = [ApemSetResult.model_validate(result) for part in parts for result in part["results"]]
        return dataset_result(run, {
            **sampling(run),
            "method": run.spec["method"],
            "n_candidates": len(in_scope(run.spec, run.manifest)),
            **summarise(run.images, labels, results),
        })

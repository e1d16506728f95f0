"""The ``overinterpretation`` job [Carter2021]: each image's sufficient input subset for its
label (the ``sis`` explainer), the label's probability with 95 % of the image masked, and
where the subsets lie on the regions uploaded with the images.

Each chunk's subsets come from TorchServe (``sufficient_subsets``); the summaries overall
and per class, and the gallery of the smallest subsets, are over every image, in the
reduce. The image list is in call order (grouped by the region masks uploaded); the result
lists the images in sample order. The library: :mod:`service.jobs.overinterpretation`.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any, Literal

from pydantic import Field

from protocol.contract import DescribeResult
from protocol.params.metrics import SisParams
from service.gateway.forms import check_library_params, check_task
from service.gateway.schemas import RequestModel, ResponseModel
from service.jobs.common import (
    ClassScope,
    DatasetId,
    Image,
    Manifest,
    check_dataset,
    check_labels,
    dataset_result,
    in_scope,
    labels_of,
    sampled,
    sampling,
)
from service.jobs.fanout import DatasetJob, Part, Run, calls
from service.jobs.overinterpretation import (
    by_class,
    images_per_call,
    in_call_order,
    mask_kinds,
    score_subsets,
    subset_gallery,
    summarise,
)
from service.jobs.registry import Spec, register
from service.settings import Settings


class OverinterpretationJobRequest(RequestModel):
    """Overinterpretation [Carter2021]: each image's sufficient input subset for its label
    (the ``sis`` explainer), the label's probability with 95 % of the image masked, and
    where the subsets lie on the regions uploaded with the images."""

    type: Literal["overinterpretation"]
    model: str
    dataset_id: DatasetId
    class_name: ClassScope = None
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the sis explainer's parameters (threshold, keep_fraction, step_fraction, mask_value)",
    )
    gallery_images: int = Field(8, ge=0, le=50, description="images with the smallest subsets, shown")
    max_images: int = Field(500, ge=1, le=20000, description="seeded sample of at most this many")
    seed: int = Field(0, ge=0, description="seed of that sample")


class RegionShare(ResponseModel):
    n_images: int = Field(description="images uploaded with this kind of mask (and a subset)")
    subset_share: float = Field(description="mean share of the subsets' pixels on the region")
    coverage: float = Field(description="mean share of the images the region covers")


class SubsetSummary(ResponseModel):
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


class SubsetImage(ResponseModel):
    file: str
    sha256: str
    class_name: str
    sis_fraction: float
    sis_confidence: float
    subset_png: str | None = Field(description="base64 PNG: the subset's pixels alone, on black")


class SubsetItem(ResponseModel):
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


@register
class Overinterpretation(DatasetJob[OverinterpretationJobRequest]):
    request = OverinterpretationJobRequest
    result = OverinterpretationJobResult

    async def check(
        self, body: OverinterpretationJobRequest, described: DescribeResult, settings: Settings
    ) -> Spec:
        check_task(described, "sufficient_subsets")
        check_library_params(SisParams, body.params, "params")
        check_labels(check_dataset(body.dataset_id, body.class_name, settings), described, "overinterpretation")
        return body.model_dump()

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[Image]:
        return in_call_order(sampled(spec, manifest))

    def units(self, spec: Spec, images: list[Image], settings: Settings) -> list[int]:
        per_call = images_per_call(spec.get("params", {}))
        return [size for _, group in groupby(images, key=mask_kinds) for size in calls(len(list(group)), per_call)]

    def map(self, run: Run, images: list[Image]) -> Part:
        _, labels = labels_of(run, images)
        params, rows = score_subsets(
            run.client, run.spec, images, labels, run.store.read_image, run.progress, run.settings.embed_concurrency
        )
        return {"params": params, "rows": rows}

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        in_sample = {item["file"]: k for k, item in enumerate(sampled(run.spec, run.manifest))}
        rows = sorted((row for part in parts for row in part["rows"]), key=lambda row: in_sample[row["file"]])
        return dataset_result(run, {
            **sampling(run),
            "params": parts[-1]["params"],
            "gallery_images": int(run.spec["gallery_images"]),
            "n_candidates": len(in_scope(run.spec, run.manifest)),
            "kept_fraction": rows[0]["kept_fraction"],
            **summarise(rows),
            "per_class": by_class(rows),
            "gallery": subset_gallery(run.client, run.spec, rows, run.store.read_image),
            "items": rows,
        })

"""The ``audit`` job: spurious-feature audit of a dataset's classes
([Singla2022, §3.2, §5]), each class's most important penultimate-layer features, their
activation maps, and the accuracy left when their regions are corrupted by Gaussian noise.

A class's feature ranking decides which features its noise calls corrupt, so a class stays
in one chunk and chunks hold whole classes; the reduce lists them. The library:
:mod:`service.jobs.audit`.
"""

from __future__ import annotations

from itertools import groupby
from typing import Annotated, Any, Literal

from pydantic import Field

from protocol.contract import DescribeResult
from service.errors import ApiError
from service.gateway.forms import check_task
from service.gateway.schemas import RequestModel, ResponseModel
from service.jobs.audit import MAX_OVERLAYS, audit_class
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
    sampling,
)
from service.jobs.fanout import DatasetJob, Part, Run
from service.jobs.registry import Spec, register
from service.jobs.reliability import sample
from service.settings import Settings


class AuditJobRequest(RequestModel):
    """Spurious-feature audit ([Singla2022, §3.2, §5]): each class's most important
    penultimate-layer features, their activation maps, and the accuracy left when their
    regions are corrupted by Gaussian noise."""

    type: Literal["audit"]
    model: str
    dataset_id: DatasetId
    class_name: ClassScope = None
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


class NoiseAccuracy(ResponseModel):
    sigma: float
    accuracy: float = Field(description="accuracy with the region corrupted at this level")
    drop: float = Field(description="clean accuracy minus that accuracy")


class ActivatingImage(ResponseModel):
    file: str
    sha256: str
    value: float = Field(description="the feature's value (mean activation) on the image")
    overlay_png: str | None = Field(None, description="base64 PNG: the feature's map over the image")


class AuditedFeature(ResponseModel):
    feature: int = Field(description="channel of the last convolutional feature map")
    rank: int = Field(description="rank by mean importance for the class [Singla2022, §3.2]")
    importance: float = Field(description="mean of value x d logit / d value over the class")
    value: float
    coverage: float = Field(description="mean of its activation map: the share of the image corrupted")
    noise: list[NoiseAccuracy]
    top_images: list[ActivatingImage]


class AuditedGroup(ResponseModel):
    name: str
    features: list[int]
    noise: list[NoiseAccuracy]


class AnnotatedRegion(ResponseModel):
    kind: Literal["core", "spurious"]
    n_images: int = Field(description="images of the class uploaded with this kind of mask")
    accuracy: float = Field(description="clean accuracy on those images")
    coverage: float = Field(description="mean of the masks as the model sees them")
    noise: list[NoiseAccuracy]


class AuditedClass(ResponseModel):
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


class AuditJobResult(ResponseModel):
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


@register
class Audit(DatasetJob[AuditJobRequest]):
    request = AuditJobRequest
    result = AuditJobResult

    async def check(self, body: AuditJobRequest, described: DescribeResult, settings: Settings) -> Spec:
        """Also caps the NAM overlays the result holds (``MAX_OVERLAYS``)."""
        check_task(described, "noise_sensitivity")
        if body.groups and body.class_name is None:
            raise ApiError(422, "invalid_params", "groups name features of one class: give class_name")
        classes = check_dataset(body.dataset_id, body.class_name, settings)
        check_labels(classes, described, "the audit")
        overlays = len(classes) * body.top_k * body.gallery_images
        if overlays > MAX_OVERLAYS:
            raise ApiError(
                422,
                "invalid_params",
                f"an audit of {len(classes)} classes with top_k {body.top_k} and gallery_images "
                f"{body.gallery_images} would return {overlays} overlays (at most {MAX_OVERLAYS}): "
                "give class_name, or lower gallery_images or top_k",
            )
        return body.model_dump()

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[Image]:
        """Each class's own seeded sample, classes in name order."""
        scope = in_scope(spec, manifest)
        return [
            image
            for name in sorted({i["class_name"] for i in scope})
            for image in sample([i for i in scope if i["class_name"] == name], int(spec["max_images"]), int(spec["seed"]))
        ]

    def units(self, spec: Spec, images: list[Image], settings: Settings) -> list[int]:
        return [len(list(group)) for _, group in groupby(images, key=lambda i: i["class_name"])]

    def map(self, run: Run, images: list[Image]) -> Part:
        model_labels, _ = labels_of(run, images)
        names = list(dict.fromkeys(i["class_name"] for i in images))
        classes = []
        for done, name in enumerate(names):

            def progress(value: float, done: int = done) -> None:
                run.progress((done + value) / len(names))

            label = model_labels.index(name)
            members = [i for i in images if i["class_name"] == name]
            audited = audit_class(
                run.client, run.spec, members, label, run.store.read_image, progress, run.settings.embed_concurrency
            )
            classes.append({"class_name": name, "label": label, **audited})
        return {"classes": classes}

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        return dataset_result(run, {
            **sampling(run),
            "sigmas": list(run.spec["sigmas"]),
            "top_k": int(run.spec["top_k"]),
            "gallery_images": int(run.spec["gallery_images"]),
            "groups": dict(run.spec.get("groups") or {}),
            "classes": [audited for part in parts for audited in part["classes"]],
        })

"""The ``criticism`` job: model criticism on one class of a dataset [Stock2018, §3.3], the
``m`` least typical images (criticisms) beside the most typical (prototypes).

Each chunk gathers its images' inputs from TorchServe (steps to flip, embeddings or
probabilities); the selection is over all of them (for ``mmd``, MMD-critic's kernel over
every embedding), so it is the reduce's. The library: :mod:`service.jobs.criticism`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from protocol.contract import DescribeResult
from service.errors import ApiError
from service.gateway.forms import check_task
from service.gateway.schemas import RequestModel, ResponseModel
from service.jobs.common import (
    DatasetId,
    Image,
    Manifest,
    check_dataset,
    dataset_result,
    fail,
    in_scope,
)
from service.jobs.criticism import (
    check_params,
    class_index,
    gather_inputs,
    join_inputs,
    run_selection,
    selected_items,
    selection_gallery,
)
from service.jobs.fanout import DatasetJob, Part, Run, calls
from service.jobs.registry import Spec, register
from service.settings import Settings

TASKS = {"adversarial": "robustness", "mmd": "embed", "probs": "embed"}
"""The TorchServe task each selection method's inputs come from (``random`` needs none)."""


class CriticismJobRequest(RequestModel):
    type: Literal["criticism"]
    model: str
    dataset_id: DatasetId
    class_name: str = Field(min_length=1, max_length=200)
    method: Literal["adversarial", "mmd", "probs", "random"]
    m: int = Field(5, ge=1, le=1000)
    params: dict[str, Any] = Field(default_factory=dict)


class CriticismItem(ResponseModel):
    rank: int
    file: str
    sha256: str
    score: float | None = None


class CriticismResult(ResponseModel):
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


@register
class Criticism(DatasetJob[CriticismJobRequest]):
    request = CriticismJobRequest
    result = CriticismResult

    async def check(self, body: CriticismJobRequest, described: DescribeResult, settings: Settings) -> Spec:
        if body.method in TASKS:
            check_task(described, TASKS[body.method])
        check_dataset(body.dataset_id, body.class_name, settings)
        problem = check_params(body.method, body.params, body.m)
        if problem:
            raise ApiError(422, "invalid_params", problem)
        return body.model_dump()

    def images(self, spec: Spec, manifest: Manifest, settings: Settings) -> list[Image]:
        return in_scope(spec, manifest)

    def units(self, spec: Spec, images: list[Image], settings: Settings) -> list[int]:
        if spec["method"] == "random":  # no model calls: nothing to spread
            return [len(images)]
        return calls(len(images), settings.embed_batch_size)

    def map(self, run: Run, images: list[Image]) -> Part:
        spec, params = run.spec, run.spec.get("params", {})
        target = class_index(run.described, spec["class_name"], params)
        if target is None and spec["method"] == "probs":
            raise fail(f"class {spec['class_name']!r} is not a label of the model; give params.class_index")
        readers = [lambda sha=c["sha256"]: run.store.read_image(sha) for c in images]
        return gather_inputs(
            run.client, spec["model"], spec["method"], params, target, readers,
            run.settings.embed_batch_size, run.progress, run.settings.embed_concurrency,
        )

    def reduce(self, run: Run, parts: list[Part]) -> dict[str, Any]:
        spec, candidates = run.spec, run.images
        try:
            selection = run_selection(spec["method"], join_inputs(parts), spec.get("params", {}), int(spec["m"]))
        except (LookupError, ValueError) as exc:  # the library's InvalidParameter / UnknownMethod
            raise fail(f"invalid criticism parameters: {exc}") from None
        return dataset_result(run, {
            "method": spec["method"],
            "m": int(spec["m"]),
            "params": selection.params,
            "n_candidates": len(candidates),
            "score_name": selection.score_name,
            "prototypes": selected_items(selection.prototypes, candidates),
            "criticisms": selected_items(selection.criticisms, candidates),
            "details": selection.details,
            "gallery_png": selection_gallery(run.store.read_image, candidates, selection),
        })

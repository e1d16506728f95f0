"""What the job types share.

On arrival (in the gateway): the request fields every dataset job has, and the checks of
the dataset, the class, the model's labels and an explanation method. In a worker: a
job's progress and its client-facing failures, and the pieces of a dataset job's run (the
images in scope, their seeded sample, their labels, the result's common keys).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field
from rq import get_current_job

from protocol.contract import DescribeResult
from protocol.params.metrics import ApemParams
from service.datasets import DatasetStore
from service.errors import ApiError
from service.gateway.forms import check_library_params, check_task
from service.jobs.registry import Spec
from service.jobs.reliability import sample
from service.settings import Settings

if TYPE_CHECKING:
    from service.jobs.fanout import Run

Manifest = dict[str, Any]
Image = dict[str, Any]
DatasetId = Annotated[str, Field(pattern=r"^[0-9a-f]{16,64}$")]
ClassScope = Annotated[
    str | None, Field(min_length=1, max_length=200, description="one class; default: every class")
]
"""A dataset job's ``class_name``: one class, or (None) every class of the dataset."""


# ------------------------------------------------------------------ on arrival


def check_dataset(dataset_id: str, class_name: str | None, settings: Settings) -> list[str]:
    """The dataset's classes in scope (``class_name``, or all); 404 / 422 when missing."""
    manifest = DatasetStore(settings).get(dataset_id)
    if manifest is None:
        raise ApiError(404, "dataset_not_found", "unknown dataset")
    if class_name is None:
        return list(manifest["classes"])
    if class_name not in manifest["classes"]:
        raise ApiError(422, "unknown_class", f"the dataset has no class {class_name!r}")
    return [class_name]


def check_labels(classes: list[str], described: DescribeResult, needs: str) -> None:
    """422 unless every class in scope is one of the model's labels (``needs``: what for)."""
    unknown = sorted(set(classes) - set(described.spec.get("labels", [])))
    if unknown:
        raise ApiError(
            422,
            "unknown_class",
            f"{needs} needs each image's label among the model's; not labels: "
            + ", ".join(map(repr, unknown[:20])),
        )


def check_explanation(
    described: DescribeResult, task: str, method: str, apem_params: dict[str, Any]
) -> None:
    """422 unless the model serves ``task`` and the explanation ``method``, and the APEM
    parameters are valid: what the jobs scoring an explanation by APEM need."""
    check_task(described, task)
    if described.explainers and method not in described.explainers:
        raise ApiError(422, "unknown_method", f"unknown explanation method {method!r}")
    check_library_params(ApemParams, apem_params, "apem_params")


# ------------------------------------------------------------------ in a worker


class JobFailure(Exception):
    """A job failure with a client-facing reason; never retried."""


def set_progress(value: float) -> None:
    """Report the share of the current RQ job done (``meta["progress"]``)."""
    job = get_current_job()
    if job is not None:
        job.meta["progress"] = round(max(0.0, min(1.0, value)), 4)
        job.save_meta()


def fail(message: str) -> JobFailure:
    """A :class:`JobFailure` to raise, its reason recorded for clients (``meta["error"]``)."""
    job = get_current_job()
    if job is not None:
        job.meta["error"] = message
        job.save_meta()
    return JobFailure(message)


def elapsed_ms(start: float) -> float:
    return round((time.time() - start) * 1000, 3)


def in_scope(spec: Spec, manifest: Manifest) -> list[Image]:
    """The dataset's images of ``spec["class_name"]`` (all of them for None)."""
    class_name = spec.get("class_name")
    return [i for i in manifest["images"] if class_name is None or i["class_name"] == class_name]


def sampled(spec: Spec, manifest: Manifest) -> list[Image]:
    """The job's seeded sample of at most ``max_images`` of the images in scope."""
    return sample(in_scope(spec, manifest), int(spec["max_images"]), int(spec["seed"]))


def labels_of(run: Run, images: list[Image]) -> tuple[list[str], list[int]]:
    """The model's labels, and each image's class as an index among them; a job failure if
    an image's class is not a label."""
    model_labels = list(run.described.spec.get("labels", []))
    index_of: dict[str, int] = {}
    for index, name in enumerate(model_labels):
        index_of.setdefault(name, index)  # list.index's answer, without a scan per image
    unknown = sorted({i["class_name"] for i in images} - index_of.keys())
    if unknown:
        raise fail(f"classes that are not labels of the model: {', '.join(unknown)}")
    return model_labels, [index_of[i["class_name"]] for i in images]


def dataset_result(run: Run, body: dict[str, Any]) -> dict[str, Any]:
    """A dataset job's result: what produced it and on what, ``body``, its time."""
    spec = run.spec
    return {
        "type": spec["type"],
        "model": spec["model"],
        "version": str(run.described.spec.get("version", "")),
        "dataset_id": spec["dataset_id"],
        "class_name": spec.get("class_name"),
        **body,
        "elapsed_ms": elapsed_ms(run.started),
    }


def sampling(run: Run) -> dict[str, Any]:
    """A sampled job's result keys saying which sample it is."""
    return {"max_images": int(run.spec["max_images"]), "seed": int(run.spec["seed"])}


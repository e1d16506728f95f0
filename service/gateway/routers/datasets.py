"""``/v1/datasets``: upload (zip / tar.gz of ``class_name/image``), describe, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, UploadFile, status
from starlette.concurrency import run_in_threadpool

from service.datasets import DatasetStore
from service.errors import ApiError
from service.gateway.deps import ApiKey, SettingsDep
from service.gateway.forms import reject_stray_fields
from service.gateway.schemas import DatasetResponse, DeletedResponse

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"], dependencies=[Depends(reject_stray_fields)]
)


def _response(manifest: dict[str, Any]) -> DatasetResponse:
    return DatasetResponse(
        dataset_id=manifest["dataset_id"],
        classes=manifest["classes"],
        n_images=manifest["n_images"],
        skipped=manifest.get("skipped", []),
        has_metadata=manifest.get("metadata") is not None,
        masks=manifest.get("masks", {}),
        created_at=manifest.get("created_at"),
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetResponse,
    responses={
        413: {"description": "archive or unpacked size too large"},
        415: {"description": "not a zip / tar / tar.gz"},
        422: {"description": "unsafe entries, no images, bad metadata"},
    },
)
async def upload_dataset(
    _: ApiKey,
    settings: SettingsDep,
    archive: Annotated[UploadFile, File(description="zip or tar.gz of class_name/image files")],
) -> DatasetResponse:
    store = DatasetStore(settings)
    manifest = await run_in_threadpool(store.ingest, archive.file)
    return _response(manifest)


@router.get(
    "/{dataset_id}", response_model=DatasetResponse, responses={404: {"description": "unknown"}}
)
def get_dataset(_: ApiKey, settings: SettingsDep, dataset_id: str) -> DatasetResponse:
    manifest = DatasetStore(settings).get(dataset_id)
    if manifest is None:
        raise ApiError(404, "dataset_not_found", "unknown dataset")
    return _response(manifest)


@router.delete(
    "/{dataset_id}", response_model=DeletedResponse, responses={404: {"description": "unknown"}}
)
def delete_dataset(_: ApiKey, settings: SettingsDep, dataset_id: str) -> DeletedResponse:
    if not DatasetStore(settings).delete(dataset_id):
        raise ApiError(404, "dataset_not_found", "unknown dataset")
    return DeletedResponse(deleted=dataset_id)

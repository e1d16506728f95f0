"""``/v1/models``: what is served, from the handler's ``describe`` task."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from protocol.contract import DescribeResult
from service.gateway.deps import ApiKey, DescribedModel, Registry, SettingsDep
from service.gateway.schemas import ModelDetail, ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_detail(described: DescribeResult) -> ModelDetail:
    spec = described.spec
    preprocessing = spec.get("preprocessing") or {}
    return ModelDetail(
        name=spec["name"],
        version=str(spec.get("version", "")),
        num_classes=int(spec["num_classes"]),
        input_size=int(spec.get("input_size") or preprocessing.get("crop") or 0),
        architecture=spec.get("architecture"),
        description=spec.get("description", ""),
        explainers=described.explainers,
        attacks=described.attacks,
        labels=list(spec.get("labels", [])),
        preprocessing=preprocessing,
        metrics=spec.get("metrics") or {},
    )


@router.get("", response_model=ModelList)
async def list_models(_: ApiKey, registry: Registry, settings: SettingsDep) -> ModelList:
    described = await asyncio.gather(*(registry.get(name) for name in settings.models))
    return ModelList(
        models=[
            ModelInfo(**model_detail(d).model_dump(include=set(ModelInfo.model_fields)))
            for d in described
        ]
    )


@router.get("/{model}", response_model=ModelDetail)
async def get_model(_: ApiKey, described: DescribedModel) -> ModelDetail:
    return model_detail(described)

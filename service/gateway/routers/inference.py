"""Single-image endpoints: predict, explain, attack, apem (multipart in, JSON out)."""

from __future__ import annotations

import time
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from protocol.contract import (
    ApemRequest,
    AttackRequest,
    ExplainOptions,
    ExplainRequest,
    PredictRequest,
    StampedResult,
)
from protocol.params.metrics import ApemParams
from service.errors import ApiError
from service.gateway.deps import ApiKey, DescribedModel, SettingsDep, TorchServe
from service.gateway.forms import (
    IMAGE_OUTPUTS,
    check_library_params,
    check_method,
    check_target,
    check_task,
    parse_attack_params,
    parse_outputs,
    parse_params,
    read_image,
    read_relevance,
    reject_stray_fields,
)
from service.gateway.schemas import (
    ApemResponse,
    AttackMethod,
    AttackResponse,
    ExplainResponse,
    PredictResponse,
)

router = APIRouter(
    prefix="/v1/models/{model}",
    tags=["inference"],
    dependencies=[Depends(reject_stray_fields)],
)
ImageFile = Annotated[UploadFile, File(description="PNG, JPEG, WebP, GIF or BMP image")]
ParamsForm = Annotated[str | None, Form(description="JSON object of method parameters")]
ApemParamsForm = Annotated[
    str | None,
    Form(
        description="JSON object of APEM parameters: step, max_steps, search (exact, "
        "approximate, sequential), normalise (APEM_norm), shuffles, seed, clip, batch_size"
    ),
]

ERRORS = {
    404: {"description": "unknown model"},
    413: {"description": "upload or image too large"},
    415: {"description": "image format not accepted"},
    422: {"description": "invalid image, method, target, parameters or unknown field"},
    503: {"description": "model server unavailable or busy (Retry-After)"},
}


Answer = TypeVar("Answer", bound=StampedResult)


def measured(result: Answer, start: float) -> Answer:
    """The model server's result as the client gets it: its ``elapsed_ms`` replaced by the
    gateway's, the whole request since ``start`` (upload, decoding, the model server)."""
    return result.model_copy(update={"elapsed_ms": round((time.perf_counter() - start) * 1000, 3)})


@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    _: ApiKey,
    described: DescribedModel,
    torchserve: TorchServe,
    settings: SettingsDep,
    image: ImageFile,
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> PredictResponse:
    start = time.perf_counter()
    name = described.spec["name"]
    pixels = await read_image(image, settings)
    k = min(top_k, int(described.spec["num_classes"]))
    result = await torchserve.call(name, PredictRequest(image=pixels, top_k=k), PredictResponse)
    return measured(result, start)


@router.post("/explain", response_model=ExplainResponse, responses=ERRORS)
async def explain(
    _: ApiKey,
    described: DescribedModel,
    torchserve: TorchServe,
    settings: SettingsDep,
    image: ImageFile,
    method: Annotated[str, Form(min_length=1, max_length=100)],
    target: Annotated[int | None, Form()] = None,
    stage: Annotated[int, Form(ge=1, le=3)] = 2,
    params: ParamsForm = None,
    score: Annotated[str | None, Form(pattern="^apem$")] = None,
    apem_params: ApemParamsForm = None,
    outputs: Annotated[
        str | None,
        Form(
            max_length=200,
            description="comma-separated pictures and arrays to return: "
            f"{', '.join(IMAGE_OUTPUTS)} (default: relevance, heatmap_png, overlay_png)",
        ),
    ] = None,
    colormap: Annotated[
        str, Form(max_length=50, description="matplotlib colormap of the pictures")
    ] = "inferno",
) -> ExplainResponse:
    start = time.perf_counter()
    check_task(described, "explain")
    check_method(method, described.explainers, "explanation")
    check_target(target, described, "target")
    parsed = parse_params(params)
    wanted = parse_outputs(outputs)
    if apem_params is not None and not score:
        raise ApiError(422, "invalid_request", "`apem_params` needs `score=apem`")
    parsed_apem = parse_params(apem_params, "apem_params")
    check_library_params(ApemParams, parsed_apem, "apem_params")
    pixels = await read_image(image, settings)
    request = ExplainRequest(
        image=pixels,
        method=method,
        target=target,
        params=parsed,
        stage=stage,  # type: ignore[arg-type]
        score="apem" if score else None,
        apem_params=parsed_apem,
        colormap=colormap,
        **({} if wanted is None else {"outputs": wanted}),
    )
    result = await torchserve.call(described.spec["name"], request, ExplainResponse)
    return measured(result, start)


@router.post("/attack", response_model=AttackResponse, responses=ERRORS)
async def attack(
    _: ApiKey,
    described: DescribedModel,
    torchserve: TorchServe,
    settings: SettingsDep,
    image: ImageFile,
    method: Annotated[AttackMethod, Form()],
    params: ParamsForm = None,
    explain: Annotated[
        str | None,
        Form(max_length=100, description="also explain the adversarial image with this method"),
    ] = None,
    explain_params: Annotated[
        str | None, Form(description="JSON object of the explanation method's parameters")
    ] = None,
    adversarial_array: Annotated[
        bool, Form(description="also return the exact adversarial image (float32 .npy)")
    ] = False,
) -> AttackResponse:
    start = time.perf_counter()
    check_task(described, "attack")
    sent, attack_params = parse_attack_params(params, method)
    check_target(attack_params.target_class, described, "params.target_class")
    explanation = None
    if explain is not None:
        check_method(explain, described.explainers, "explanation")
        explanation = ExplainOptions(
            method=explain, params=parse_params(explain_params, "explain_params")
        )
    elif explain_params is not None:
        raise ApiError(422, "invalid_request", "`explain_params` needs `explain`")
    pixels = await read_image(image, settings)
    request = AttackRequest(
        image=pixels,
        method=method,
        params=sent,
        explanation=explanation,
        adversarial_array=adversarial_array,
    )
    result = await torchserve.call(described.spec["name"], request, AttackResponse)
    return measured(result, start)


@router.post("/apem", response_model=ApemResponse, responses=ERRORS)
async def apem(
    _: ApiKey,
    described: DescribedModel,
    torchserve: TorchServe,
    settings: SettingsDep,
    image: ImageFile,
    method: Annotated[str | None, Form(max_length=100)] = None,
    params: ParamsForm = None,
    target: Annotated[int | None, Form()] = None,
    relevance: Annotated[UploadFile | None, File(description=".npy relevance map")] = None,
    apem_params: ApemParamsForm = None,
) -> ApemResponse:
    start = time.perf_counter()
    check_task(described, "apem")
    check_target(target, described, "target")
    if (method is None) == (relevance is None):
        raise ApiError(
            422,
            "invalid_request",
            "give either `method` (with `params`) or a `relevance` .npy file",
        )
    encoded = None
    if relevance is not None:
        encoded = await read_relevance(relevance, settings)
    else:
        check_method(method or "", described.explainers, "explanation")
    parsed = parse_params(params)
    parsed_apem = parse_params(apem_params, "apem_params")
    check_library_params(ApemParams, parsed_apem, "apem_params")
    pixels = await read_image(image, settings)
    request = ApemRequest(
        image=pixels,
        method=method,
        params=parsed,
        relevance=encoded,
        target=target,
        apem_params=parsed_apem,
    )
    result = await torchserve.call(described.spec["name"], request, ApemResponse)
    return measured(result, start)

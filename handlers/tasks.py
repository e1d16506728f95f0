"""Server-independent task execution: contract requests in, contract results out.

:class:`TaskRunner` owns one loaded model and turns each ``protocol.contract`` request
into a call of the plain libraries (explainers, attacks, metrics). Any model server needs
only a thin adapter around it (``handlers.torchserve_handler`` is TorchServe's); the
runner itself knows nothing about HTTP or TorchServe.

Errors a client can cause raise :class:`TaskError` with an HTTP-like status and a code;
the adapter turns them into ``contract.ErrorBody`` replies.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import matplotlib
import numpy as np
import torch
from PIL import Image

from handlers import visualization
from handlers.attacks import AttackBatchResult, available_attacks, get_attack
from handlers.attacks.pictures import adversarial_png, as_delivered, perturbation_png
from handlers.explainers import Explanation, available_explainers, create_explainer
from handlers.metrics.apem import apem
from handlers.metrics.explanation_filter import explanation_filter
from handlers.metrics.feature_sensitivity import class_features, mask_sensitivity, noise_sensitivity
from handlers.metrics.overinterpretation import sufficient_subsets
from handlers.models.classifier import ImageShapeError, PixelClassifier, preprocess
from handlers.models.derived import inference_embeddings, inference_logits
from protocol import contract
from protocol.arrays import InvalidArray, decode_array, encode_array
from protocol.params.attacks import library_names
from protocol.params.metrics import ApemParams, FilterParams
from protocol.spec import ModelSpec
from protocol.validation import InvalidParameter, StrictParams, UnknownMethod, parse_params

MAX_IMAGE_PIXELS = 40_000_000
MAX_BATCH_IMAGES = 256


class TaskError(Exception):
    """A request the runner refuses; ``status`` is the HTTP status an adapter should use."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> contract.ErrorBody:
        return contract.ErrorBody(error=contract.ErrorDetail(code=self.code, message=self.message))


@contextmanager
def refusals() -> Iterator[None]:
    """Turn the libraries' validation errors into 422 :class:`TaskError` s."""
    try:
        yield
    except UnknownMethod as error:
        raise TaskError(422, "unknown_method", str(error)) from None
    except InvalidArray as error:
        raise TaskError(422, "invalid_relevance", str(error)) from None
    except InvalidParameter as error:
        raise TaskError(422, "bad_parameter", str(error)) from None


Params = TypeVar("Params", bound=StrictParams)


def checked(model: type[Params], values: dict[str, Any]) -> Params:
    """``values`` validated as ``model`` before any work is done for the request (422)."""
    with refusals():
        return parse_params(model, values)


def one_per_image(name: str, values: Sequence[Any], x: torch.Tensor) -> None:
    """422 unless ``values`` holds one entry per image of the batch ``x``."""
    if len(values) != x.shape[0]:
        raise TaskError(422, "bad_parameter", f"{name}: expected {x.shape[0]}, got {len(values)}")


def check_colormap(name: str) -> None:
    if name not in matplotlib.colormaps:
        raise TaskError(422, "bad_parameter", f"colormap: unknown matplotlib colormap {name!r}")


def png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_image(data: str) -> Image.Image:
    """Base64 PNG (a JSON request's image) -> RGB PIL image, refusing anything else."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise TaskError(422, "invalid_image", "image is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise TaskError(413, "image_too_large", f"image has more than {MAX_IMAGE_PIXELS} pixels")
            return img.convert("RGB")
    except TaskError:
        raise
    except Exception:
        raise TaskError(422, "invalid_image", "image is not a decodable PNG") from None


def raw_image(image: contract.RawImage) -> Image.Image:
    """RGB8 pixels of a binary frame (``protocol.frames``) -> RGB PIL image, checked."""
    if image.pixels is None:
        raise TaskError(422, "invalid_image", "a raw image carries its pixels only in a binary frame")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise TaskError(413, "image_too_large", f"image has more than {MAX_IMAGE_PIXELS} pixels")
    if len(image.pixels) != image.width * image.height * 3:
        raise TaskError(422, "invalid_image", "the raw image's size does not match width x height x 3")
    return Image.frombuffer("RGB", (image.width, image.height), image.pixels, "raw", "RGB", 0, 1)


def request_image(image: contract.ImageData) -> Image.Image:
    return decode_image(image) if isinstance(image, str) else raw_image(image)


class TaskRunner:
    """Runs contract tasks on one :class:`PixelClassifier`."""

    def __init__(self, model: PixelClassifier, spec: ModelSpec, device: torch.device) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self._runners: dict[str, Callable[[Any], contract.BaseModel]] = {
            "describe": self.describe,
            "embed": self.embed,
            "explain": self.explain,
            "attack": self.attack,
            "apem": self.apem,
            "apem_set": self.apem_set,
            "robustness": self.robustness,
            "filter": self.filter,
            "class_features": self.class_features,
            "noise_sensitivity": self.noise_sensitivity,
            "mask_sensitivity": self.mask_sensitivity,
            "sufficient_subsets": self.sufficient_subsets,
        }

    # ------------------------------------------------------------------ plumbing
    def tensor(self, image: contract.ImageData) -> torch.Tensor:
        """One request image as a ``(1, 3, S, S)`` pixel tensor on the model's device."""
        try:
            pixels = preprocess(request_image(image), self.spec.preprocessing)
        except ImageShapeError as error:
            raise TaskError(422, "invalid_image", str(error)) from None
        return pixels.unsqueeze(0).to(self.device)

    def region_masks(self, name: str, masks: Sequence[contract.ImageData], x: torch.Tensor) -> torch.Tensor:
        """One mask image per image of ``x`` as ``(N, S, S)`` in [0, 1] (grey level = mask):
        through the model's own resizing and cropping, so each mask stays on its image."""
        one_per_image(name, masks, x)
        return self.tensors(masks).mean(dim=1)

    def tensors(self, images: Sequence[contract.ImageData]) -> torch.Tensor:
        if len(images) > MAX_BATCH_IMAGES:
            raise TaskError(422, "bad_parameter", f"at most {MAX_BATCH_IMAGES} images per request")
        return torch.cat([self.tensor(i) for i in images])

    def class_score(self, index: int, probability: float) -> contract.ClassScore:
        return contract.ClassScore(class_index=index, label=self.spec.labels[index], probability=probability)

    def _stamp(self, start: float) -> dict[str, object]:
        return {"model": self.spec.name, "version": self.spec.version,
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 3)}

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities through the fused inference copy (the predict hot path)."""
        return torch.softmax(inference_logits(self.model, x), dim=1)

    def run(self, request: contract.BaseModel) -> contract.BaseModel:
        """Run any single (non-batched) task request."""
        task = getattr(request, "task", None)
        runner = self._runners.get(str(task))
        if runner is None:
            raise TaskError(422, "unknown_task", f"task {task!r} is not served; served: {sorted(self.tasks)}")
        return runner(request)

    @property
    def tasks(self) -> list[str]:
        return ["predict", *self._runners]

    # ------------------------------------------------------------------ tasks
    def predict_batch(self, requests: Sequence[contract.PredictRequest]) -> list[contract.PredictResult | TaskError]:
        """Predict for many requests in one forward pass (TorchServe batches across clients)."""
        start = time.perf_counter()
        decoded: list[torch.Tensor | TaskError] = []
        for request in requests:
            try:
                decoded.append(self.tensor(request.image))
            except TaskError as error:
                decoded.append(error)
        good = [t for t in decoded if isinstance(t, torch.Tensor)]
        probs = self.probabilities(torch.cat(good)) if good else torch.empty(0)
        results: list[contract.PredictResult | TaskError] = []
        row = 0
        for request, item in zip(requests, decoded, strict=True):
            if isinstance(item, TaskError):
                results.append(item)
                continue
            k = min(request.top_k, self.spec.num_classes)
            values, indices = probs[row].topk(k)
            row += 1
            results.append(contract.PredictResult(
                predictions=[self.class_score(int(i), float(v)) for v, i in zip(values, indices, strict=True)],
                **self._stamp(start),
            ))
        return results

    def describe(self, request: contract.DescribeRequest) -> contract.DescribeResult:
        return contract.DescribeResult(
            spec=self.spec.model_dump(), tasks=self.tasks,
            explainers=available_explainers(), attacks=available_attacks(),
        )

    def embed(self, request: contract.EmbedRequest) -> contract.EmbedResult:
        start = time.perf_counter()
        x = self.tensors(request.images)
        embeddings, logits = inference_embeddings(self.model, x)
        probs = torch.softmax(logits, dim=1)
        return contract.EmbedResult(
            embeddings=encode_array(embeddings.cpu().numpy()),
            probabilities=encode_array(probs.cpu().numpy()),
            **self._stamp(start),
        )


    # ------------------------------------------------------------------ explanations
    def _targets(self, target: int | None) -> torch.Tensor | None:
        if target is None:
            return None
        if not 0 <= target < self.spec.num_classes:
            raise TaskError(422, "bad_parameter", f"target: class {target} is out of range for "
                            f"a model with {self.spec.num_classes} classes")
        return torch.tensor([target])

    def _explanation(self, x: torch.Tensor, method: str, params: dict[str, Any],
                     target: int | None) -> Explanation:
        targets = self._targets(target)
        with refusals():
            return create_explainer(method, params).explain(self.model, x, targets)

    def _score(self, x: torch.Tensor, stage_map: torch.Tensor, target: int,
               apem_params: ApemParams) -> contract.ApemScore:
        """APEM of a [0, 1] map (thesis 003, chapter 3) for one image."""
        with refusals():
            outcome = apem(self.model, x, stage_map, targets=torch.tensor([target]), params=apem_params)
        return contract.ApemScore(**outcome.score(0))

    def explain(self, request: contract.ExplainRequest) -> contract.ExplainResult:
        start = time.perf_counter()
        return self._explain_pixels(self.tensor(request.image), request, start)

    def _explain_pixels(self, x: torch.Tensor, options: contract.ExplainOptions,
                        start: float) -> contract.ExplainResult:
        """Explain a ``(1, 3, S, S)`` pixel tensor as ``options`` say."""
        check_colormap(options.colormap)
        apem_params = checked(ApemParams, options.apem_params) if options.score == "apem" else None
        explanation = self._explanation(x, options.method, options.params, options.target)
        target = int(explanation.targets[0])
        probs = self.probabilities(x)[0]
        predicted = int(probs.argmax())
        stage_map = visualization.to_stage(explanation.relevance, x, options.stage)
        # APEM needs a map in [0, 1] of pixel relevance: stage 1 (signed) is scored as stage 2
        score_map = stage_map if options.stage != 1 else visualization.to_stage(explanation.relevance, x, 2)
        outputs = set(options.outputs)
        image = x[0].cpu()
        pictures = self._pictures(outputs, explanation, stage_map[0].cpu(), image, options.colormap)
        return contract.ExplainResult(
            method=explanation.method, params=explanation.params, target=target, stage=options.stage,
            prediction=self.class_score(predicted, float(probs[predicted])),
            relevance=encode_array(stage_map[0].cpu().numpy()) if "relevance" in outputs else None,
            extras=self._extras(explanation),
            apem=None if apem_params is None else self._score(x, score_map, target, apem_params),
            **pictures, **self._stamp(start),
        )

    @staticmethod
    def _map_pictures(outputs: set[str], stage_map: torch.Tensor, image: torch.Tensor,
                      colormap: str) -> dict[str, str | None]:
        """The pictures of a [0, 1] map alone: ``heatmap_png`` and ``overlay_png``."""
        pictures: dict[str, str | None] = {}
        if "heatmap_png" in outputs:
            pictures["heatmap_png"] = png_b64(visualization.heatmap_png(stage_map, colormap))
        if "overlay_png" in outputs:
            pictures["overlay_png"] = png_b64(visualization.overlay_png(stage_map, image, colormap))
        return pictures

    @classmethod
    def _pictures(cls, outputs: set[str], explanation: Explanation, stage_map: torch.Tensor,
                  image: torch.Tensor, colormap: str) -> dict[str, str | None]:
        pictures = cls._map_pictures(outputs, stage_map, image, colormap)
        segments = explanation.extras.get("segments")
        if segments is not None and outputs & {"attention_png", "path_png"}:
            weights = explanation.extras["weights"][0]
            k = int(explanation.params.get("num_features", 8))
            if "attention_png" in outputs:
                pictures["attention_png"] = png_b64(visualization.attention_png(image, segments[0], weights, k))
            if "path_png" in outputs:
                pictures["path_png"] = png_b64(visualization.path_png(image, segments[0], weights, k))
        subset = explanation.extras.get("sis_mask")
        if subset is not None and "attention_png" in outputs:
            pictures["attention_png"] = png_b64(visualization.subset_png(image, subset[0]))
        return pictures

    @staticmethod
    def _extras(explanation: Explanation) -> dict[str, Any]:
        """Method-specific results of the one explained image, JSON-friendly."""
        extras: dict[str, Any] = {}
        for key, value in explanation.extras.items():
            item = value[0] if isinstance(value, list | np.ndarray) and len(value) else value
            if isinstance(item, np.ndarray):
                extras[key] = encode_array(item).model_dump()
            elif isinstance(item, torch.Tensor):
                extras[key] = encode_array(item.cpu().numpy()).model_dump()
            else:
                extras[key] = item.tolist() if hasattr(item, "tolist") else item
        return extras

    def apem(self, request: contract.ApemRequest) -> contract.ApemResult:
        start = time.perf_counter()
        x = self.tensor(request.image)
        apem_params = checked(ApemParams, request.apem_params)
        score_map, target, method_params = self._stage_map(x, request)
        score = self._score(x, score_map, target, apem_params)
        return contract.ApemResult(method=request.method, method_params=method_params, target=target,
                                   **score.model_dump(), **self._stamp(start))

    def _stage_map(
        self, x: torch.Tensor, request: contract.ApemRequest | contract.FilterRequest
    ) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """The ``(1, C, S, S)`` [0, 1] map a request scores (its method's stage-2 explanation
        or its own ``relevance``), the explained class and the method's parameters."""
        if (request.method is None) == (request.relevance is None):
            raise TaskError(422, "bad_request", "give either an explanation method or a relevance map")
        if request.relevance is not None:
            size = self.spec.preprocessing.crop
            with refusals():
                array = decode_array(request.relevance)
            if array.shape not in ((size, size), (1, size, size), (3, size, size)):
                raise TaskError(422, "invalid_relevance",
                                f"relevance must be ({size}, {size}), (1, {size}, {size}) or (3, {size}, {size}); "
                                f"got {tuple(array.shape)}")
            if array.min() < 0 or array.max() > 1:
                raise TaskError(422, "invalid_relevance", "relevance values must lie in [0, 1]")
            score_map = torch.from_numpy(array).unsqueeze(0).to(self.device)
            target = int(self.probabilities(x)[0].argmax()) if request.target is None else request.target
            self._targets(target)
            method_params: dict[str, Any] = {}
        else:
            explanation = self._explanation(x, str(request.method), request.params, request.target)
            target = int(explanation.targets[0])
            score_map = visualization.to_stage(explanation.relevance, x, 2)
            method_params = explanation.params
        return score_map, target, method_params

    def apem_set(self, request: contract.ApemSetRequest) -> contract.ApemSetResult:
        """APEM of many images' stage-2 explanations of their predictions, with their losses
        (thesis 003, chapter 3 and section 5.4); the caller correlates them over its set."""
        start = time.perf_counter()
        x = self.tensors(request.images)
        if request.labels is not None:
            one_per_image("labels", request.labels, x)
        apem_params = checked(ApemParams, request.apem_params)
        explanation = self._explanation(x, request.method, request.params, None)
        maps = visualization.to_stage(explanation.relevance, x, 2)
        labels = None if request.labels is None else torch.tensor(request.labels)
        with refusals():
            outcome = apem(self.model, x, maps, targets=explanation.targets, labels=labels, params=apem_params)
        return contract.ApemSetResult(
            method=explanation.method, method_params=explanation.params,
            params=outcome.params.model_dump(), grid=outcome.params.grid_description(),
            approximate=outcome.approximate, targets=outcome.targets,
            eps_minus=outcome.eps_minus, eps_plus=outcome.eps_plus, apem=outcome.apem_per_image,
            apem_norm=outcome.apem_norm_per_image, losses=outcome.losses, **self._stamp(start),
        )

    # ------------------------------------------------------------------ spurious-feature audit
    def class_features(self, request: contract.ClassFeaturesRequest) -> contract.ClassFeaturesResult:
        """Neural feature importances for each image's label (paper 002, section 3.2)."""
        start = time.perf_counter()
        x = self.tensors(request.images)
        one_per_image("labels", request.labels, x)
        for label in request.labels:
            self._targets(label)
        found = class_features(self.model, x, torch.tensor(request.labels, device=self.device))
        return contract.ClassFeaturesResult(
            importance=encode_array(found.importance), values=encode_array(found.values),
            predictions=found.predictions.tolist(), **self._stamp(start),
        )

    def noise_sensitivity(self, request: contract.NoiseSensitivityRequest) -> contract.NoiseSensitivityResult:
        """Predictions with features' regions corrupted by noise (paper 002, section 5)."""
        start = time.perf_counter()
        x = self.tensors(request.images)
        with refusals():
            found = noise_sensitivity(self.model, x, request.seeds, request.features, request.sigmas, request.groups)
        return contract.NoiseSensitivityResult(
            sigmas=request.sigmas, clean=found.clean.tolist(), features=found.features.tolist(),
            groups=found.groups.tolist(), coverage=found.coverage.tolist(), **self._stamp(start),
        )

    def mask_sensitivity(self, request: contract.MaskSensitivityRequest) -> contract.MaskSensitivityResult:
        """Predictions with annotated regions corrupted by noise (paper 002, section 5)."""
        start = time.perf_counter()
        x = self.tensors(request.images)
        masks = self.region_masks("masks", request.masks, x)
        with refusals():
            predictions, clean = mask_sensitivity(self.model, x, masks, request.seeds, request.sigmas)
        return contract.MaskSensitivityResult(
            sigmas=request.sigmas, clean=clean.tolist(), predictions=predictions.tolist(),
            coverage=masks.mean(dim=(1, 2)).tolist(), **self._stamp(start),
        )

    def sufficient_subsets(self, request: contract.SufficientSubsetsRequest) -> contract.SufficientSubsetsResult:
        """Sufficient input subsets for the labels (paper 004), and their share on regions."""
        start = time.perf_counter()
        x = self.tensors(request.images)
        one_per_image("labels", request.labels, x)
        regions = {name: self.region_masks(f"regions.{name}", masks, x) for name, masks in request.regions.items()}
        with refusals():
            report = sufficient_subsets(self.model, x, torch.tensor(request.labels), request.params, regions)
        return contract.SufficientSubsetsResult(**dataclasses.asdict(report), **self._stamp(start))

    # ------------------------------------------------------------------ attacks
    def _attack(self, method: str, params: dict[str, Any], x: torch.Tensor) -> tuple[AttackBatchResult, dict[str, Any]]:
        with refusals():
            attack = get_attack(method, library_names(params))
            target = attack.params.target
            if target is not None:
                self._targets(target)
            return attack(self.model, x), attack.params.model_dump(mode="json")

    def attack(self, request: contract.AttackRequest) -> contract.AttackResult:
        start = time.perf_counter()
        x = self.tensor(request.image)
        result, params = self._attack(request.method, request.params, x)
        record = result.record(0)
        adversarial = result.adversarial[:1].to(self.device)
        png_probs = self.probabilities(as_delivered(adversarial))[0]
        png_class = int(png_probs.argmax())
        explanation = None
        if request.explanation is not None:
            options = request.explanation
            if options.target is None:  # paper 000, figure 5: the adversarial image for its new class
                options = options.model_copy(update={"target": record["prediction"]})
            explanation = self._explain_pixels(adversarial, options, time.perf_counter())
        return contract.AttackResult(
            method=request.method, params=params,
            original=self.class_score(record["clean_prediction"], record["clean_confidence"]),
            adversarial=self.class_score(record["prediction"], record["confidence"]),
            success=record["success"], steps_to_flip=record["steps_to_flip"],
            linf=record["linf"], l2=record["l2"],
            adversarial_png=png_b64(adversarial_png(result.adversarial[0])),
            png_prediction=self.class_score(png_class, float(png_probs[png_class])),
            perturbation_png=png_b64(perturbation_png(x[0].cpu(), result.adversarial[0])),
            adversarial_array=encode_array(result.adversarial[0].numpy()) if request.adversarial_array else None,
            explanation=explanation, **self._stamp(start),
        )

    def robustness(self, request: contract.RobustnessRequest) -> contract.RobustnessResult:
        """Steps to flip per image (adversarial model criticism, paper 000, section 3.3)."""
        start = time.perf_counter()
        x = self.tensors(request.images)
        result, params = self._attack(request.method, request.params, x)
        return contract.RobustnessResult(
            method=request.method, params=params, steps_to_flip=result.steps_to_flip_list(),
            predictions=result.clean_predictions.tolist(),
            adversarial_predictions=result.predictions.tolist(),
            robustness=result.reference_confidence.tolist(), **self._stamp(start),
        )

    # ------------------------------------------------------------------ filter
    def filter(self, request: contract.FilterRequest) -> contract.FilterResult:
        """Explanation Filter (thesis 003, Algorithm 2) of one image's stage-2 map."""
        start = time.perf_counter()
        x = self.tensor(request.image)
        apem_params = checked(ApemParams, request.apem_params)
        filter_params = checked(FilterParams, {"levels": 256, **request.filter_params})
        stage_map, target, method_params = self._stage_map(x, request)
        with refusals():
            outcome = explanation_filter(self.model, x[0], stage_map[0], target, apem_params, filter_params)
        return contract.FilterResult(
            method=request.method, params=method_params, target=target,
            filtered=encode_array(outcome.filtered.cpu().numpy()),
            **self._map_pictures({"heatmap_png", "overlay_png"}, outcome.filtered, x[0].cpu(), "inferno"),
            filter_params=filter_params.model_dump(),
            **outcome.summary(), **self._stamp(start),
        )

"""Server-independent task execution: contract requests in, contract results out.

:class:`TaskRunner` owns one loaded model and turns each ``handlers.contract`` request
into a call of the plain libraries (explainers, attacks, metrics). Any model server needs
only a thin adapter around it (``handlers.torchserve_handler`` is TorchServe's); the
runner itself knows nothing about HTTP or TorchServe.

Errors a client can cause raise :class:`TaskError` with an HTTP-like status and a code;
the adapter turns them into ``contract.ErrorBody`` replies.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from handlers import contract
from handlers.models.classifier import PixelClassifier, preprocess
from handlers.spec import ModelSpec

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


def decode_image(data: str) -> Image.Image:
    """Base64 PNG (as the gateway sends it) -> RGB PIL image, refusing anything else."""
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


class TaskRunner:
    """Runs contract tasks on one :class:`PixelClassifier`."""

    def __init__(self, model: PixelClassifier, spec: ModelSpec, device: torch.device) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self._runners: dict[str, Callable[[contract.BaseModel], contract.BaseModel]] = {
            "describe": self.describe,
            "embed": self.embed,
        }

    # ------------------------------------------------------------------ plumbing
    def tensor(self, image_b64: str) -> torch.Tensor:
        """One request image as a ``(1, 3, S, S)`` pixel tensor on the model's device."""
        return preprocess(decode_image(image_b64), self.spec.preprocessing).unsqueeze(0).to(self.device)

    def tensors(self, images: Sequence[str]) -> torch.Tensor:
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
        return torch.softmax(self.model(x), dim=1)

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

    def describe(self, request: contract.BaseModel) -> contract.DescribeResult:
        return contract.DescribeResult(spec=self.spec.model_dump(), tasks=self.tasks, explainers=[], attacks=[])

    def embed(self, request: contract.BaseModel) -> contract.EmbedResult:
        assert isinstance(request, contract.EmbedRequest)
        start = time.perf_counter()
        x = self.tensors(request.images)
        with torch.no_grad():
            embeddings = self.model.embed(x)
            probs = torch.softmax(self.model.head(self.model.feature_map(x)), dim=1)
        return contract.EmbedResult(
            embeddings=encode_array(embeddings.cpu().numpy()),
            probabilities=encode_array(probs.cpu().numpy()),
            **self._stamp(start),
        )


def encode_array(array: np.ndarray) -> contract.EncodedArray:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return contract.EncodedArray(data=base64.b64encode(buffer.getvalue()).decode(), shape=list(array.shape))

"""``embed``: penultimate-layer embeddings and class probabilities, from one fused pass."""

from __future__ import annotations

import time

import torch

from handlers.models.derived import inference_embeddings
from handlers.tasks.common import stamp, tensors
from handlers.tasks.registry import runs
from handlers.tasks.served import ServedModel
from protocol import contract
from protocol.arrays import encode_array


@runs(contract.EmbedRequest)
def run(served: ServedModel, request: contract.EmbedRequest) -> contract.EmbedResult:
    start = time.perf_counter()
    x = tensors(served, request.images)
    embeddings, logits = inference_embeddings(served.model, x)
    probs = torch.softmax(logits, dim=1)
    return contract.EmbedResult(
        embeddings=encode_array(embeddings.cpu().numpy()),
        probabilities=encode_array(probs.cpu().numpy()),
        **stamp(served, start),
    )

"""Every contract task, walked from the registry: declared once on the torch-free side, parsed
by the union, run by its handler runner on a tiny model, and answered by the fake server.

A new task is tested here the moment it is registered: it only needs its example request in
:data:`EXAMPLES` (the first test fails until it has one).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import BaseModel, TypeAdapter

from handlers.explainers.lrp_core import canonized
from handlers.models.derived import fused_classifier
from handlers.tasks import RUNNERS, ServedModel, TaskError, TaskRunner
from handlers.tasks.registry import runs
from handlers.torchserve_handler import BeyondHandler
from protocol import contract
from protocol.contract.registry import register_task, task_name
from tests.unit import fake_torchserve
from tests.unit.torchserve_context import FakeContext, tiny_model_dir


def _png(seed: int, size: int = 32) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGES = [_png(0), _png(1)]
GRID = {"step": 50.0, "max_steps": 4}  # APEM in a few passes on a 32x32 image
EXAMPLES: dict[str, dict[str, Any]] = {
    "describe": {},
    "predict": {"image": IMAGES[0], "top_k": 2},
    "explain": {"image": IMAGES[0], "method": "gradient", "score": "apem", "apem_params": GRID},
    "attack": {"image": IMAGES[0], "method": "fgsm", "explanation": {"method": "gradient"},
               "adversarial_array": True},
    "apem": {"image": IMAGES[0], "method": "gradient", "apem_params": GRID},
    "apem_set": {"images": IMAGES, "labels": [0, 1], "method": "gradient", "apem_params": GRID},
    "embed": {"images": IMAGES},
    "robustness": {"images": IMAGES, "params": {"steps": 2}},
    "filter": {"image": IMAGES[0], "method": "gradient", "apem_params": GRID, "filter_params": {"levels": 4}},
    "class_features": {"images": IMAGES, "labels": [0, 1]},
    "noise_sensitivity": {"images": IMAGES, "seeds": [1, 2], "features": [0, 3], "groups": [[0, 3]],
                          "sigmas": [0.5]},
    "mask_sensitivity": {"images": IMAGES, "masks": IMAGES, "seeds": [1, 2], "sigmas": [0.5]},
    "sufficient_subsets": {"images": IMAGES[:1], "labels": [0], "params": {"step_fraction": 0.25},
                           "regions": {"left": IMAGES[1:]}},
}
"""One small valid request body per contract task (without its ``task`` field)."""

UNION = TypeAdapter(contract.TaskRequest)


def _request(name: str) -> BaseModel:
    return UNION.validate_json(json.dumps({"task": name, **EXAMPLES[name]}))


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> TaskRunner:
    torch.set_num_threads(1)
    return TaskRunner.load(tiny_model_dir(tmp_path_factory.mktemp("tiny")), torch.device("cpu"))


def test_every_task_is_declared_once_and_covered_everywhere() -> None:
    assert list(contract.TASKS) and set(EXAMPLES) == set(contract.TASKS)
    for name, declared in contract.TASKS.items():
        assert declared.name == name == task_name(declared.request)
        assert issubclass(declared.request, contract.Strict) and issubclass(declared.result, contract.Strict)
        assert getattr(contract, declared.request.__name__) is declared.request  # importable by name
        assert getattr(contract, declared.result.__name__) is declared.result
    assert list(RUNNERS) == list(contract.TASKS)
    assert set(fake_torchserve.FAKES) == set(contract.TASKS)


@pytest.mark.parametrize("name", list(contract.TASKS))
def test_the_union_parses_each_task_as_its_request_model(name: str) -> None:
    request = _request(name)
    assert type(request) is contract.TASKS[name].request
    assert UNION.validate_json(request.model_dump_json()) == request  # the wire round trip


@pytest.mark.parametrize("name", list(contract.TASKS))
def test_the_fake_answers_each_task_with_its_result_model(name: str) -> None:
    reply = fake_torchserve.answer(_request(name), "shapes-resnet")
    contract.TASKS[name].result.model_validate(reply)


@pytest.mark.parametrize("name", list(contract.TASKS))
def test_the_handler_runs_each_task_to_its_result_model(name: str, runner: TaskRunner) -> None:
    result = runner.run(_request(name))
    assert type(result) is contract.TASKS[name].result
    sent = result.model_dump_json()
    assert contract.TASKS[name].result.model_validate_json(sent).model_dump_json() == sent


def test_describe_lists_what_the_registry_holds(runner: TaskRunner) -> None:
    described = runner.run(contract.DescribeRequest())
    assert described.tasks == runner.tasks == list(contract.TASKS)
    assert described.contract_version == contract.CONTRACT_VERSION


def test_a_batched_task_answers_each_request_of_a_handler_batch(tmp_path: Path) -> None:
    """TorchServe's batch of predict requests runs in one call of the batched runner; a bad
    image gets its own 422 and the other tasks of the batch still run."""
    assert RUNNERS["predict"].batched and not RUNNERS["explain"].batched
    context = FakeContext(tiny_model_dir(tmp_path))
    handler = BeyondHandler()
    handler.initialize(context)
    bodies = [{"task": "predict", "image": IMAGES[0]}, {"task": "predict", "image": "bm90IGEgcG5n"},
              {"task": "embed", "images": IMAGES}, {"task": "predict", "image": IMAGES[1], "top_k": 1}]
    replies = [json.loads(r) for r in handler.handle([{"body": json.dumps(b).encode()} for b in bodies], context)]
    assert context.status == {1: 422} and replies[1]["error"]["code"] == "invalid_image"
    assert len(replies[0]["predictions"]) == 5 and len(replies[3]["predictions"]) == 1
    assert replies[2]["embeddings"]["shape"][0] == 2
    alone = handler.runner.run(contract.PredictRequest(image=IMAGES[1], top_k=1))  # type: ignore[union-attr]
    assert replies[3]["predictions"] == [score.model_dump() for score in alone.predictions]
    with pytest.raises(TaskError, match="not a decodable PNG"):
        handler.runner.run(contract.PredictRequest(image="bm90IGEgcG5n"))  # type: ignore[union-attr]


def test_the_registries_refuse_what_they_cannot_dispatch() -> None:
    class Nameless(contract.Strict):
        task: str = "nameless"

    class Duplicate(contract.Strict):
        task: Literal["predict"] = "predict"

    with pytest.raises(TypeError, match="Literal"):
        register_task(Nameless, contract.PredictResult)
    with pytest.raises(ValueError, match="already registered"):
        register_task(Duplicate, contract.PredictResult)
    with pytest.raises(TypeError, match="not the request model of a contract task"):
        runs(Duplicate)
    with pytest.raises(ValueError, match="already has a runner"):
        runs(contract.PredictRequest)
    assert contract.TASKS["predict"].request is contract.PredictRequest


def test_the_first_request_builds_no_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The served model's copies exist before any request: the first requests of the tasks
    that use them (predictions, gradients through the fused copy, LRP) build none."""
    runner = TaskRunner.load(tiny_model_dir(tmp_path), torch.device("cpu"))
    served: ServedModel = runner.served
    pixels = torch.rand(1, 3, 32, 32)

    def no_build(network: torch.nn.Module) -> torch.nn.Module:
        raise AssertionError("a derived copy was built on a request")

    monkeypatch.setattr("handlers.models.derived._inference_network", no_build)
    monkeypatch.setattr("handlers.explainers.lrp_core.canonize", no_build)
    for name in ("predict", "embed", "attack"):
        runner.run(_request(name))
    for method in ("gradient", "lrp", "gradcam"):
        runner.run(contract.ExplainRequest(image=IMAGES[0], method=method))
    with torch.no_grad():
        assert canonized(served.model.network, served.model.normalize(pixels)) is served.lrp
    assert fused_classifier(served.model, pixels).fused is served.inference.fused


def test_attack_parameters_keep_their_names_and_classes_one_check(runner: TaskRunner) -> None:
    """The request's attack parameter names reach the library and come back in the echo;
    a class index out of range is 422 ``invalid_target`` with the gateway's message shape."""
    classes = runner.served.spec.num_classes
    sent = {"epsilon": 0.02, "target_class": 1}
    result = runner.run(contract.AttackRequest(image=IMAGES[0], method="fgsm", params=sent))
    assert {k: result.params[k] for k in sent} == sent and "eps" not in result.params
    for request, name in (
        (contract.AttackRequest(image=IMAGES[0], method="pgd", params={"target_class": classes}), "target_class"),
        (contract.ExplainRequest(image=IMAGES[0], method="gradient", target=classes), "target"),
        (contract.ClassFeaturesRequest(images=IMAGES, labels=[0, classes]), "labels"),
    ):
        with pytest.raises(TaskError) as refusal:
            runner.run(request)
        assert (refusal.value.status, refusal.value.code) == (422, "invalid_target")
        assert refusal.value.message == f"{name}: class {classes} is out of range for a model with {classes} classes"

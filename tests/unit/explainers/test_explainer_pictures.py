"""Each method draws its own pictures (``Explainer.pictures``), and the explain task serves
exactly those: LIME its attention image and explanation path, SIS its subset, the others none
beyond the map's heatmap and overlay."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.explainers import available_explainers, get_explainer
from handlers.explainers.base import Explainer
from handlers.tasks import TaskRunner
from protocol import contract
from tests.unit.torchserve_context import tiny_model_dir

OWN_PICTURES = {"lime": {"attention_png", "path_png"}, "sis": {"attention_png"}}
ALL = ["heatmap_png", "overlay_png", "attention_png", "path_png"]
FAST = {"lime": {"n": 40, "num_features": 3}, "sis": {"step_fraction": 0.25},
        "smoothgrad": {"n": 2}, "integrated_gradients": {"steps": 4}}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> TaskRunner:
    torch.set_num_threads(1)
    return TaskRunner.load(tiny_model_dir(tmp_path_factory.mktemp("tiny")), torch.device("cpu"))


def _image() -> str:
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("method", available_explainers())
def test_the_explain_task_serves_the_methods_own_pictures(method: str, runner: TaskRunner) -> None:
    request = contract.ExplainRequest(image=_image(), method=method, params=FAST.get(method, {}),
                                      outputs=ALL)
    result = runner.run(request)
    drawn = {name for name in ALL if getattr(result, name) is not None}
    assert drawn == {"heatmap_png", "overlay_png"} | OWN_PICTURES.get(method, set())
    for name in drawn:
        picture = Image.open(io.BytesIO(base64.b64decode(getattr(result, name))))
        assert picture.size[1] == 32  # drawn at the model's input size (a path may be wider)


def test_only_the_pictures_asked_for_are_drawn(runner: TaskRunner) -> None:
    request = contract.ExplainRequest(image=_image(), method="lime", params=FAST["lime"],
                                      outputs=["path_png"])
    result = runner.run(request)
    assert result.path_png is not None
    assert result.attention_png is result.heatmap_png is result.overlay_png is None


def test_only_the_methods_with_pictures_override_the_default() -> None:
    overriding = {name for name in available_explainers() if "pictures" in vars(get_explainer(name))}
    assert overriding == set(OWN_PICTURES)
    assert Explainer.pictures(None, torch.zeros(3, 4, 4), set(ALL)) == {}  # type: ignore[arg-type]

"""APEM and the Explanation Filter on the trained demo models [doValle2019, ch. 4-5].

A coarse grid (``step = 4`` L1 units, up to 2,000) keeps the CPU cost to seconds; the
properties tested are the thesis's: gradient maps beat shuffled maps, shuffled maps score
about zero, relevance on the object beats relevance on the background, APEM correlates
negatively with the loss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from handlers.explainers import explain
from handlers.metrics.apem import apem, shuffled
from handlers.metrics.explanation_filter import explanation_filter
from handlers.visualization import to_stage
from model_store.train import to_tensor
from tests.unit.adversarial_helpers import explanation_filter_literal

GRID = {"step": 4, "max_steps": 500}


def _correct(model, split, n: int = 8):  # noqa: ANN001, ANN202
    x, y = to_tensor(split.images[: 2 * n]), torch.from_numpy(split.labels[: 2 * n])
    with torch.no_grad():
        ok = (model(x).argmax(1) == y).nonzero().flatten()[:n]
    return x[ok], y[ok], torch.from_numpy(split.core_masks[: 2 * n])[ok]


@pytest.fixture(scope="module")
def gradient_case(demo_model, shapes_split):  # noqa: ANN001, ANN201
    model, _ = demo_model("shapes-resnet")
    x, y, _ = _correct(model, shapes_split("spurious", "test"))
    maps = to_stage(explain(model, x, "gradient").relevance, x, 2)
    return model, x, y, maps


def test_gradient_maps_beat_shuffled_maps_which_score_about_zero(gradient_case, record_property) -> None:  # noqa: ANN001
    """[doValle2019, Tab. 4.2] (gradient maps far above shuffled ones, which score about 0) and
    section 5.4 (higher APEM, lower loss). On 8 images of a coarse grid, how far the gradient
    is ahead depends on the training run (mean APEM 72-453 against shuffled 57 over seeds
    0-2, docs/seeds.md): asserted is that it is ahead, and a negative correlation with the
    loss wherever it is defined (APEM not constant)."""
    model, x, y, maps = gradient_case
    gradient = apem(model, x, maps, labels=y, params=GRID)
    mixed = apem(model, x, shuffled(maps.unsqueeze(1), 1, seed=0)[:, 0], params=GRID)
    g, s = np.array(gradient.apem_per_image), np.array(mixed.apem_per_image)
    assert gradient.spearman is not None
    rho = gradient.spearman["rho"]
    for key, value in (("apem_gradient_mean", g.mean()), ("apem_gradient_median", np.median(g)),
                       ("apem_shuffled_mean", s.mean()), ("apem_shuffled_median", np.median(s)),
                       ("images_gradient_ahead", (g > s).sum()), ("spearman_apem_loss", rho)):
        record_property(key, float(value))
    assert g.mean() > s.mean()
    assert math.isnan(rho) or rho < 0


def test_apem_norm_of_the_gradient_is_positive(gradient_case, record_property) -> None:  # noqa: ANN001
    model, x, _, maps = gradient_case
    result = apem(model, x[:3], maps[:3], params={"step": 8, "max_steps": 250, "normalise": True, "shuffles": 10})
    assert result.apem_norm is not None
    record_property("apem_norm", result.apem_norm)
    assert result.apem_norm > 0.2


def test_core_mask_beats_background_on_the_fair_model(demo_model, shapes_split, record_property) -> None:  # noqa: ANN001
    model, _ = demo_model("shapes-resnet-fair")
    x, _, core = _correct(model, shapes_split("fair", "test"))
    on_core = apem(model, x, core.float(), params=GRID)
    on_background = apem(model, x, (~core).float(), params=GRID)
    record_property("apem_core", on_core.apem)
    record_property("apem_background", on_background.apem)
    assert on_core.apem > on_background.apem
    assert sum(c > b for c, b in zip(on_core.apem_per_image, on_background.apem_per_image, strict=True)) >= 7


def test_exact_search_equals_the_sequential_scan_on_a_demo_model(gradient_case) -> None:  # noqa: ANN001
    model, x, _, maps = gradient_case
    grid = {"step": 16, "max_steps": 100}
    exact = apem(model, x[:3], maps[:3], params=grid)
    sequential = apem(model, x[:3], maps[:3], params={**grid, "search": "sequential"})
    assert exact.eps_minus == sequential.eps_minus and exact.eps_plus == sequential.eps_plus
    assert exact.stats.forward_passes * 5 < sequential.stats.forward_passes


@pytest.mark.parametrize("name", ["shapes-resnet", "shapes-vgg"])
def test_exact_search_proves_most_of_the_thesis_grid_and_still_equals_the_scan(name, demo_model, shapes_split, record_property) -> None:  # noqa: ANN001
    """On the thesis's integer grid the exact search evaluates a few points near each flip;
    margin bounds clear the rest (handlers/metrics/line_bounds.py), same answers."""
    model, _ = demo_model(name)
    x, _, _ = _correct(model, shapes_split("spurious", "test"), n=2)
    maps = to_stage(explain(model, x, "gradient").relevance, x, 2)
    grid = {"step": 1, "max_steps": 1000}
    exact = apem(model, x, maps, params=grid)
    sequential = apem(model, x, maps, params={**grid, "search": "sequential"})
    assert exact.eps_minus == sequential.eps_minus and exact.eps_plus == sequential.eps_plus
    record_property("proven_share", exact.stats.proven_points / sequential.stats.evaluations)
    record_property("evaluations_exact_over_sequential", exact.stats.evaluations / sequential.stats.evaluations)
    assert exact.stats.proven_points > 0.9 * sequential.stats.evaluations
    assert exact.stats.evaluations * 5 < sequential.stats.evaluations


def test_filter_on_a_demo_map_equals_the_literal_algorithm(gradient_case, record_property) -> None:  # noqa: ANN001
    model, x, _, maps = gradient_case
    params = {"levels": 6}
    fast = explanation_filter(model, x[1], maps[1], apem_params=GRID, params=params)
    literal = explanation_filter_literal(model, x[1], maps[1], apem_params=GRID, levels=6)
    record_property("apem_before", fast.apem_before)
    record_property("apem_after", fast.apem_after)
    assert torch.equal(fast.filtered, literal.filtered) and fast.apem_after == literal.apem_after
    assert fast.apem_after >= fast.apem_before


def test_apem_set_task_scores_each_image_as_the_single_image_task(demo_model, shapes_split) -> None:  # noqa: ANN001
    """The set task (one TorchServe call per batch of a job) gives each image what /apem
    gives it alone, plus the losses its caller correlates [doValle2019, §5.4]."""
    import base64

    from handlers.tasks import ServedModel, TaskError, TaskRunner
    from protocol import contract
    from protocol.png import png_bytes
    from protocol.ranking import spearman_with_loss

    model, spec = demo_model("shapes-resnet")
    runner = TaskRunner(ServedModel.build(model, spec, torch.device("cpu")))
    split = shapes_split("spurious", "test")
    images = [base64.b64encode(png_bytes(split.images[i])).decode() for i in range(6)]
    labels = [int(v) for v in split.labels[:6]]
    result = runner.run(contract.ApemSetRequest(images=images, labels=labels, method="gradient", apem_params=GRID))
    assert result.params["max_steps"] == 500 and result.grid["cap"] == 4 * 501 and not result.approximate
    for i, image in enumerate(images):
        alone = runner.run(contract.ApemRequest(image=image, method="gradient", apem_params=GRID))
        assert (result.eps_minus[i], result.eps_plus[i], result.apem[i], result.targets[i]) == (
            alone.eps_minus, alone.eps_plus, alone.apem, alone.target)
    x, y = to_tensor(split.images[:6]), torch.tensor(labels)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    assert np.allclose(result.losses, expected.numpy(), atol=1e-5)
    maps = to_stage(explain(model, x, "gradient").relevance, x, 2)
    in_one_batch = apem(model, x, maps, labels=y, params=GRID).spearman
    assert in_one_batch is not None
    assert spearman_with_loss(np.array(result.apem), np.array(result.losses)) == in_one_batch
    with pytest.raises(TaskError, match="labels"):
        runner.run(contract.ApemSetRequest(images=images, labels=labels[:2], method="gradient"))


@pytest.mark.parametrize(
    "request_for",
    [
        lambda image: ("ApemRequest", {"image": image, "method": "lime", "apem_params": {"max_steps": 0}}),
        lambda image: ("ApemSetRequest", {"images": [image], "method": "lime", "apem_params": {"step": -1}}),
        lambda image: ("ExplainRequest", {"image": image, "method": "lime", "score": "apem", "apem_params": {"x": 1}}),
        lambda image: ("FilterRequest", {"image": image, "method": "lime", "filter_params": {"levels": 1}}),
    ],
)
def test_bad_apem_parameters_are_refused_before_explaining(request_for, demo_model, shapes_split, monkeypatch) -> None:  # noqa: ANN001
    """A LIME explanation takes seconds: a request whose APEM or filter parameters are bad
    is refused (422) before it is computed, not after."""
    import base64

    from handlers.tasks import ServedModel, TaskError, TaskRunner
    from protocol import contract
    from protocol.png import png_bytes

    model, spec = demo_model("shapes-resnet")
    runner = TaskRunner(ServedModel.build(model, spec, torch.device("cpu")))
    explained = []
    monkeypatch.setattr("handlers.tasks.common.create_explainer", lambda *args: explained.append(args))
    image = base64.b64encode(png_bytes(shapes_split("spurious", "test").images[0])).decode()
    name, fields = request_for(image)
    with pytest.raises(TaskError) as refusal:
        runner.run(getattr(contract, name)(**fields))
    assert refusal.value.status == 422 and refusal.value.code == "bad_parameter"
    assert explained == []

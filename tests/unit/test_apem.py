"""APEM: directed maps, closed-form flips on a linear model, exact = sequential search."""

from __future__ import annotations

import pytest
import torch

from handlers.metrics.apem import apem, directed, shuffled
from handlers.metrics.flip_search import (
    NOT_FOUND,
    BatchedScan,
    Bisection,
    CertifiedScan,
    Grid,
    SearchStats,
    SequentialScan,
)
from protocol.validation import InvalidParameter
from tests.unit.adversarial_helpers import (
    LinearPixelModel,
    assert_unchanged,
    images,
    snapshot,
    tiny_cnn,
)


class TableProblem:
    """A fake search problem whose flips come from a table (any pattern, monotone or not)."""

    def __init__(self, table: torch.Tensor, batch_size: int, members: int = 1) -> None:
        self.table, self.batch_size, self.members = table, batch_size, members
        self.units = table.shape[0]
        self.stats = SearchStats()

    def evaluate(self, units: torch.Tensor, ks: torch.Tensor, step: float) -> torch.Tensor:
        assert units.numel() * self.members <= max(self.batch_size, self.members)
        assert torch.all(ks >= 1) and torch.all(ks <= self.table.shape[1])
        self.stats.forward_passes += 1
        self.stats.evaluations += units.numel()
        return self.table[units, ks - 1]


class ProvableTableProblem(TableProblem):
    """A table whose runs without a flip are "proven" up to ``provable[u]`` points long."""

    segments_per_pass = 8
    bounds = True  # the fake always has bounds

    def __init__(self, table: torch.Tensor, batch_size: int, provable: torch.Tensor, members: int = 1) -> None:
        super().__init__(table, batch_size, members)
        self.provable = provable
        self.runs_tried = 0

    def certify(self, units: torch.Tensor, ks: torch.Tensor, lengths: torch.Tensor, step: float) -> torch.Tensor:
        assert torch.all(lengths >= 1) and torch.all(ks + lengths - 1 <= self.table.shape[1])
        self.runs_tried += units.numel()
        self.stats.bound_passes += 1
        points = torch.arange(self.table.shape[1]) + 1
        inside = (points >= ks.unsqueeze(1)) & (points < (ks + lengths).unsqueeze(1))
        clear = ~(self.table[units] & inside).any(dim=1)
        return torch.where(clear & (lengths <= self.provable[units]), 1.0, -1.0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("batch_size", "first_chunk", "members"), [(1, 1, 1), (7, 3, 1), (64, 16, 1), (40, 4, 10)])
@pytest.mark.parametrize("strategy", [BatchedScan, CertifiedScan])
def test_exact_scans_equal_the_sequential_scan_on_arbitrary_patterns(
    strategy: type, seed: int, batch_size: int, first_chunk: int, members: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    table = torch.rand((25, 200), generator=generator) < torch.rand((25, 1), generator=generator) * 0.05
    table[3] = False  # never flips
    provable = torch.randint(0, 80, (25,), generator=generator)  # run lengths the fake bounds prove
    grid = Grid(step=0.5, max_steps=200)
    expected = SequentialScan().search(TableProblem(table, 1), grid)  # type: ignore[arg-type]
    assert expected[3] == NOT_FOUND
    for h in (None, torch.randint(0, 50, (25,), generator=generator)):
        problem = ProvableTableProblem(table, batch_size, provable, members)
        assert torch.equal(strategy(first_chunk).search(problem, grid, h), expected)
        assert (problem.stats.proven_points > 0) == (strategy is CertifiedScan)


def test_certified_scan_proves_long_runs_and_evaluates_little() -> None:
    first = torch.tensor([700, 1500, 0, 40])
    table = (torch.arange(1, 2001).unsqueeze(0) == first.unsqueeze(1)) & (first.unsqueeze(1) > 0)
    problem = ProvableTableProblem(table, 64, torch.full((4,), 64))
    found = CertifiedScan(16).search(problem, Grid(1.0, 2000))  # type: ignore[arg-type]
    assert found.tolist() == [700, 1500, NOT_FOUND, 40]
    assert problem.stats.evaluations <= 4 * 16
    assert problem.stats.proven_points + problem.stats.evaluations >= 699 + 1499 + 2000 + 39


@pytest.mark.parametrize(
    ("provable", "first_chunk", "most_runs"),
    [
        (0, 16, 2),  # nothing is ever proven: the probe (one run per unit) is all
        (4, 4, 3 * 2 * 4 + 2),  # runs of 4 prove 4 points a run, below points_per_run: three rounds more
    ],
)
def test_certified_scan_stops_proving_when_proofs_do_not_pay(provable: int, first_chunk: int, most_runs: int) -> None:
    first = torch.tensor([700, 0])
    table = (torch.arange(1, 2001).unsqueeze(0) == first.unsqueeze(1)) & (first.unsqueeze(1) > 0)
    batched = TableProblem(table, 64)
    BatchedScan(first_chunk).search(batched, Grid(1.0, 2000))  # type: ignore[arg-type]
    problem = ProvableTableProblem(table, 64, torch.full((2,), provable))
    found = CertifiedScan(first_chunk).search(problem, Grid(1.0, 2000))  # type: ignore[arg-type]
    assert found.tolist() == [700, NOT_FOUND]
    assert problem.runs_tried <= most_runs
    assert problem.stats.evaluations <= batched.stats.evaluations + 64


def test_bisection_finds_the_flip_of_monotone_patterns_in_few_passes() -> None:
    first = torch.tensor([1, 2, 7, 64, 100, 1000, 0])
    table = (torch.arange(1, 1001).unsqueeze(0) >= first.unsqueeze(1)) & (first.unsqueeze(1) > 0)
    problem = TableProblem(table, 1000)
    found = Bisection().search(problem, Grid(1.0, 1000))  # type: ignore[arg-type]
    assert found.tolist() == first.tolist()
    assert problem.stats.forward_passes <= 2 * 11


def test_directed_relevance_has_unit_l1_norm_and_the_gradient_sign() -> None:
    maps = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    sign = torch.randn(2, 3, 4, 4, dtype=torch.float64).sign()
    d = directed(maps, sign)
    assert torch.allclose(d.abs().flatten(1).sum(1), torch.ones(2, dtype=torch.float64))
    assert torch.equal(d.sign(), sign * (maps > 0))
    assert torch.equal(directed(torch.zeros(1, 1, 4, 4), sign[:1].float()), torch.zeros(1, 3, 4, 4))


def test_shuffles_permute_values() -> None:
    maps = torch.rand(3, 1, 5, 5)
    mixed = shuffled(maps, 4, seed=0)
    assert mixed.shape == (3, 4, 1, 5, 5)
    for i in range(3):
        for j in range(4):
            assert torch.equal(mixed[i, j].flatten().sort().values, maps[i].flatten().sort().values)
    assert torch.equal(mixed, shuffled(maps, 4, seed=0)) and not torch.equal(mixed, shuffled(maps, 4, seed=1))


def _linear_case() -> tuple[LinearPixelModel, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    d = 3 * 4 * 4
    weight = torch.randn((2, d), generator=generator, dtype=torch.float64)
    model = LinearPixelModel(weight, torch.tensor([0.7, -0.7], dtype=torch.float64))
    x = torch.rand((3, 3, 4, 4), generator=generator, dtype=torch.float64)
    maps = torch.rand((3, 4, 4), generator=generator, dtype=torch.float64)
    return model, x, maps


def _closed_form(model: LinearPixelModel, x: torch.Tensor, m: torch.Tensor, step: float) -> list[float]:
    """First grid point where ``w_p . (x + eps d) + b_p`` falls below the other class."""
    w, b = model.linear.weight, model.linear.bias
    out = []
    for i in range(x.shape[0]):
        p = int((w @ x[i].flatten() + b).argmax())
        dw, db = w[p] - w[1 - p], b[p] - b[1 - p]
        margin = float(dw @ x[i].flatten() + db)
        r = m[i].expand(3, 4, 4).flatten()
        slope = float((r / r.sum() * dw.abs()).sum())  # sign(grad CE) = -sign(dw)
        out.append((int(margin / slope / step) + 1) * step)
    return out


def test_eps_minus_and_plus_match_the_closed_form_of_a_linear_model() -> None:
    model, x, maps = _linear_case()
    result = apem(model, x, maps, params={"step": 0.25, "max_steps": 4000})
    assert result.eps_minus == _closed_form(model, x, maps, 0.25)
    assert result.eps_plus == _closed_form(model, x, 1 - maps, 0.25)
    per_image = [p - m for p, m in zip(result.eps_plus, result.eps_minus, strict=True)]
    assert result.apem_per_image == per_image
    assert result.apem == pytest.approx(sum(per_image) / 3)
    approx = apem(model, x, maps, params={"step": 0.25, "max_steps": 4000, "search": "approximate"})
    assert approx.approximate and not result.approximate
    assert approx.eps_minus == result.eps_minus and approx.eps_plus == result.eps_plus


def _gradient_maps(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    (g,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), leaf)
    g = g.abs().sum(1)
    return g / g.flatten(1).amax(1).view(-1, 1, 1)


@pytest.mark.parametrize("clip", [False, True])
def test_exact_search_equals_the_sequential_scan_on_a_network(clip: bool) -> None:
    model, x = tiny_cnn(seed=5), images(4, seed=5)
    maps = _gradient_maps(model, x)
    grid = {"step": 0.2, "max_steps": 80, "clip": clip, "normalise": True, "shuffles": 3}
    before = snapshot(model)
    exact = apem(model, x, maps, params={**grid, "batch_size": 37, "first_chunk": 5})
    sequential = apem(model, x, maps, params={**grid, "search": "sequential"})
    assert_unchanged(model, before)
    assert exact.eps_minus == sequential.eps_minus and exact.eps_plus == sequential.eps_plus
    assert exact.eps_shuffle_minus == sequential.eps_shuffle_minus
    assert exact.eps_shuffle_plus == sequential.eps_shuffle_plus
    assert exact.apem_norm == sequential.apem_norm
    assert any(e is not None for e in exact.eps_minus)
    assert exact.stats.forward_passes < sequential.stats.forward_passes / 5


def test_sizes_beyond_the_grid_are_none_and_capped_in_the_mean() -> None:
    model, x, maps = _linear_case()
    result = apem(model, x, maps, params={"step": 0.25, "max_steps": 2})
    assert result.eps_minus == [None, None, None] and result.apem == 0.0
    zero = apem(model, x, torch.zeros_like(maps), params={"step": 0.25, "max_steps": 4000})
    assert zero.eps_minus == [None] * 3  # no relevance: the map cannot flip the model
    assert all(v < 0 for v in zero.apem_per_image)


def test_outputs_for_the_contract_and_spearman() -> None:
    model, x, maps = _linear_case()
    result = apem(model, x, maps, labels=torch.tensor([0, 1, 0]), params={"step": 0.25, "max_steps": 4000})
    score = result.score(1)
    assert score["eps_minus"] == result.eps_minus[1] and score["grid"]["step"] == 0.25
    assert "L1" in score["grid"]["unit"] and score["approximate"] is False
    assert result.spearman is not None and -1 <= result.spearman["rho"] <= 1


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"step": 0}, "step"),
        ({"max_steps": 0}, "max_steps"),
        ({"search": "fast"}, "search"),
        ({"shuffle": 3}, "shuffle"),
        ({"max_steps": 100_001}, "max_steps"),  # work bounds
        ({"shuffles": 101}, "shuffles"),
        ({"batch_size": 4097}, "batch_size"),
    ],
)
def test_bad_parameters(params: dict, param: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        apem(*_linear_case(), params=params)
    assert info.value.param == param


def test_bad_relevance_maps() -> None:
    model, x, maps = _linear_case()
    with pytest.raises(InvalidParameter, match="relevance"):
        apem(model, x, maps * 3)
    with pytest.raises(InvalidParameter, match="relevance"):
        apem(model, x, maps[:, :2])
    with pytest.raises(InvalidParameter, match="targets"):
        apem(model, x, maps, targets=torch.tensor([0, 1, 5]))
    with pytest.raises(InvalidParameter, match="at least one image"):
        apem(model, x[:0], maps[:0])


def test_works_under_an_outer_inference_mode() -> None:
    model, x, maps = _linear_case()
    expected = apem(model, x, maps, params={"step": 0.25, "max_steps": 4000})
    with torch.inference_mode():
        inside = apem(model, x.clone(), maps.clone(), params={"step": 0.25, "max_steps": 4000})
    assert inside.eps_minus == expected.eps_minus and inside.eps_plus == expected.eps_plus

"""Model criticism selection: MMD-critic against brute force, baselines, registry, gallery."""

from __future__ import annotations

import io
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from protocol.criticism import (
    SelectionInputs,
    available_selections,
    gallery_png,
    get_selection,
    select,
)
from protocol.criticism import selection as sel
from protocol.validation import InvalidParameter, UnknownMethod


def _embeddings(n: int = 60, d: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(3, d))
    return centres[rng.integers(0, 3, n)] + rng.normal(size=(n, d))


def test_selection_package_does_not_import_torch() -> None:
    code = (
        "import sys; import protocol.criticism, protocol.criticism.selection, "
        "protocol.criticism.methods, protocol.criticism.gallery; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _dense(kernel: sel.RbfKernel) -> np.ndarray:
    return kernel.rows(np.arange(kernel.n))


@pytest.mark.parametrize("block_rows", [256, 7])
def test_rbf_kernel_and_median_heuristic(block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sel, "BLOCK_ROWS", block_rows)  # one block, or the triangle in pieces
    x = _embeddings(20)
    kernel = sel.RbfKernel(x)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    assert kernel.sigma == pytest.approx(np.median(d[np.triu_indices(20, 1)]))
    assert np.allclose(_dense(kernel), np.exp(-(d**2) / (2 * kernel.sigma**2)))
    assert np.allclose(kernel.colsum, _dense(kernel).sum(0)) and np.all(kernel.diagonal == 1.0)
    assert sel.RbfKernel(x, bandwidth=2.0).sigma == 2.0


@pytest.mark.parametrize("n", [2, 3, 257, 600, 601])
def test_median_distance_is_exact_across_blocks(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sel, "BLOCK_ROWS", 64)  # many blocks, and rows that end inside one
    x = np.random.default_rng(n).normal(size=(n, 7)) * np.r_[1.0, 10.0, 0.1, 1, 1, 1, 1]
    x[:3] = x[0]  # ties and zero distances
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))[np.triu_indices(n, 1)]
    expected = np.median(d) if np.median(d) > 0 else 1.0
    assert sel.median_distance(x) == pytest.approx(expected, rel=1e-12)


def _median_of_all_distances(x: np.ndarray) -> float:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))[np.triu_indices(len(x), 1)]
    return float(np.median(d))


def test_median_distance_when_the_sampled_bracket_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample whose bracket holds neither middle value: a pass over all pairs instead."""
    x = np.random.default_rng(1).normal(size=(700, 5))
    monkeypatch.setattr(sel, "_sampled_bracket", lambda *_: (0.0, 1e-300))
    assert sel.median_distance(x) == pytest.approx(_median_of_all_distances(x), rel=1e-12)


@pytest.mark.parametrize("kind", ["spread", "equal"])
def test_median_distance_narrows_a_full_bracket(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """More values in the bracket than a pass may keep: histograms narrow it, still exact,
    also when most distances are equal (up to rounding: the corners of a simplex)."""
    monkeypatch.setattr(sel, "KEPT_VALUES", 50)
    monkeypatch.setattr(sel, "BLOCK_ROWS", 64)
    x = np.random.default_rng(2).normal(size=(700, 5)) if kind == "spread" else 3.0 * np.eye(300)
    assert sel.median_distance(x) == pytest.approx(_median_of_all_distances(x), rel=1e-12)


def test_median_distance_of_mostly_equal_examples_is_the_fallback() -> None:
    """Over half the pairs identical: the median distance is 0, so the heuristic gives 1.0
    (not the rounding noise of ``|a|^2 + |b|^2 - 2 a.b`` between equal rows)."""
    x = np.random.default_rng(3).normal(size=(400, 4)) * 5.0
    x[:300] = x[0]
    assert sel.median_distance(x) == 1.0
    x[:150] = x[350]  # now under half the pairs are equal: a true distance
    assert sel.median_distance(x) == pytest.approx(_median_of_all_distances(x), rel=1e-12)


def test_large_class_in_bounded_memory() -> None:
    """MMD-critic on 6,000 embeddings without the 288 MB kernel matrix (or its temporaries)."""
    x = np.random.default_rng(0).normal(size=(6000, 16))
    tracemalloc.start()
    (protos, _), (crits, _), sigma = sel.mmd_critic(x, 5, 5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 120e6, f"peak {peak / 1e6:.0f} MB"
    assert len(set(protos) | set(crits)) == 10 and sigma > 0


def j_b(kernel: np.ndarray, selected: list[int]) -> float:
    """[Stock2018, eq. 3]: ``J_b(S) = 2/(n|S|) sum_{i in [n], j in S} k_ij - 1/|S|^2 sum_{i, j in S} k_ij``."""
    s = np.asarray(selected, dtype=np.int64)
    n = kernel.shape[0]
    return float(2.0 * kernel[:, s].sum() / (n * s.size) - kernel[np.ix_(s, s)].sum() / s.size**2)


def _greedy_prototypes_brute_force(kernel: np.ndarray, m: int) -> tuple[list[int], list[float]]:
    chosen: list[int] = []
    values = []
    for _ in range(m):
        scores = [(-np.inf if c in chosen else j_b(kernel, [*chosen, c])) for c in range(len(kernel))]
        chosen.append(int(np.argmax(scores)))
        values.append(max(scores))
    return chosen, values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prototypes_equal_brute_force_greedy_j_b(seed: int) -> None:
    kernel = sel.RbfKernel(_embeddings(seed=seed))
    picked, values, row_sum = sel.mmd_prototypes(kernel, 8)
    expected, expected_values = _greedy_prototypes_brute_force(_dense(kernel), 8)
    assert picked.tolist() == expected
    assert np.allclose(values, expected_values)
    assert np.allclose(row_sum, _dense(kernel)[expected].sum(0))


def _criticisms_brute_force(kernel: np.ndarray, protos: list[int], m: int, lam: float) -> list[int]:
    n = len(kernel)
    w = kernel.mean(0) - kernel[protos].mean(0)
    chosen: list[int] = []
    for _ in range(m):
        best, best_value = -1, -np.inf
        for c in range(n):
            if c in protos or c in chosen:
                continue
            subset = [*chosen, c]
            sign, logdet = np.linalg.slogdet(kernel[np.ix_(subset, subset)])
            value = np.abs(w[subset]).sum() + lam * (logdet if sign > 0 else -np.inf)
            if value > best_value:
                best, best_value = c, value
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("lam", [1e-5, 0.05, 1.0])
def test_criticisms_equal_brute_force_with_log_determinant(lam: float) -> None:
    kernel = sel.RbfKernel(_embeddings(seed=3))
    protos = sel.mmd_prototypes(kernel, 5)[0].tolist()
    picked, witness = sel.mmd_criticisms(kernel, protos, 7, lam)
    dense = _dense(kernel)
    assert picked.tolist() == _criticisms_brute_force(dense, protos, 7, lam)
    assert np.allclose(witness, (dense.mean(0) - dense[protos].mean(0))[picked])
    assert not set(picked) & set(protos)


def test_diversity_regulariser_avoids_duplicates() -> None:
    x = _embeddings(40, seed=4)
    x = np.concatenate([x, x[:1] + 1e-9, x[:1] + 2e-9, np.full((1, 5), 40.0)])  # near-copies and an outlier
    picked, _ = sel.mmd_criticisms(sel.RbfKernel(x), [], 3, lam=1.0)
    assert len({tuple(np.round(x[i], 6)) for i in picked}) == 3


def test_adversarial_selection_semantics() -> None:
    steps = [None, 3, 1, -1, 0, 2, 1, -1]
    robustness = [0.5, 0.1, 0.9, 0.9, 0.0, 0.3, 0.2, 0.7]
    (protos, p_steps), (crits, c_steps) = sel.adversarial_selection(steps, 3, 4, robustness)
    assert protos.tolist() == [3, 7, 0] and p_steps.tolist() == [-1, -1, -1]
    assert crits.tolist() == [6, 2, 5, 1] and c_steps.tolist() == [1, 1, 2, 3]
    (_, _), (crits, _) = sel.adversarial_selection(steps, 3, 2, robustness, include_misclassified=True)
    assert crits.tolist() == [4, 6]


def test_adversarial_details_give_the_robustness_that_ranked_the_items() -> None:
    """Every prototype "never" flipped: its score is None, its robustness says why it ranks."""
    inputs = SelectionInputs(steps_to_flip=np.array([-1, 3, 1, -1, -1]), robustness=np.array([0.5, 0.1, 0.9, 0.8, 0.6]))
    result = select("adversarial", inputs, {"prototypes": 2, "criticisms": 2})
    assert [i.index for i in result.prototypes] == [3, 4] and [i.score for i in result.prototypes] == [None, None]
    assert result.details["robustness"]["prototypes"] == [0.8, 0.6]
    assert [i.index for i in result.criticisms] == [2, 1] and result.details["robustness"]["criticisms"] == [0.9, 0.1]
    assert "robustness" not in select("adversarial", SelectionInputs(steps_to_flip=np.array([-1, 2, 1]))).details


def test_probability_and_random_baselines() -> None:
    confidence = np.array([0.95, 0.05, 0.5, 0.99, 0.08, 0.91, 0.2])
    (protos, p), (crits, c) = sel.probability_selection(confidence, 5, 5)
    assert protos.tolist() == [3, 0, 5] and crits.tolist() == [1, 4]
    assert p.tolist() == [0.99, 0.95, 0.91]
    first = sel.random_selection(30, 4, 4, seed=3)
    again = sel.random_selection(30, 4, 4, seed=3)
    assert np.array_equal(first[0][0], again[0][0]) and np.array_equal(first[1][0], again[1][0])
    assert len(set(first[0][0]) | set(first[1][0])) == 8


INPUTS = SelectionInputs(
    embeddings=_embeddings(30),
    confidence=np.linspace(0, 1, 30),
    steps_to_flip=np.array([(-1 if i % 3 == 0 else i % 5) for i in range(30)]),
)


@pytest.mark.parametrize("method", available_selections())
def test_every_registered_method_returns_valid_items(method: str) -> None:
    result = select(method, INPUTS, {"prototypes": 2, "criticisms": 3})
    assert result.method == method
    indices = [i.index for i in result.prototypes + result.criticisms]
    assert len(indices) == len(set(indices)) and all(0 <= i < 30 for i in indices)
    assert len(result.prototypes) == 2 and len(result.criticisms) == 3
    assert result.params["prototypes"] == 2


def test_registry_and_parameter_errors() -> None:
    assert set(available_selections()) == {"adversarial", "mmd", "probs", "random"}
    with pytest.raises(UnknownMethod):
        get_selection("kmeans")
    with pytest.raises(InvalidParameter) as info:
        select("probs", INPUTS, {"low": 0.95, "high": 0.9})
    assert info.value.param == "low"
    with pytest.raises(InvalidParameter) as info:
        select("mmd", INPUTS, {"bandwidth": 0})
    assert info.value.param == "bandwidth"
    with pytest.raises(InvalidParameter, match="embeddings"):
        select("mmd", SelectionInputs(count=5))


def test_gallery_png_has_two_rows_of_tiles() -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((30, 16, 16, 3)) * 255).astype(np.uint8)
    result = select("adversarial", INPUTS, {"prototypes": 3, "criticisms": 2})
    picture = Image.open(io.BytesIO(gallery_png(images, result, tile=32)))
    assert picture.format == "PNG" and picture.mode == "RGB"
    assert picture.size[1] > 2 * 32 and picture.size[0] >= 3 * 32
    tile = np.asarray(picture)[12 : 12 + 32, 72 : 72 + 32]  # first prototype's tile
    expected = np.asarray(Image.fromarray(images[result.prototypes[0].index]).resize((32, 32), Image.Resampling.NEAREST))
    assert np.array_equal(tile, expected)


@pytest.mark.parametrize("method", ["adversarial", "mmd", "probs", "random"])
def test_gather_inputs_from_a_model(method: str) -> None:
    import torch

    from tests.unit.adversarial_helpers import gather_inputs, images, tiny_cnn

    model, x = tiny_cnn(), images(10, dtype=torch.float32)
    model = model.float()
    inputs = gather_inputs(model, x, 2, method, attack_params={"step_size": 0.01})
    needed = get_selection(method).requires
    assert all(getattr(inputs, name) is not None and len(getattr(inputs, name)) == 10 for name in needed)
    assert inputs.n == 10
    if method == "probs":
        assert np.all((inputs.confidence >= 0) & (inputs.confidence <= 1))
    result = select(method, inputs, {"prototypes": 2, "criticisms": 2})
    assert result.method == method

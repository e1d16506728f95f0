"""The torch- and scipy-free Spearman correlation against scipy's [doValle2019, §5.4]."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.special import betainc
from scipy.stats import spearmanr

from protocol.ranking import average_ranks, regularized_beta, spearman_with_loss


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


@pytest.mark.parametrize(("a", "b", "x"), [(0.5, 0.5, 0.3), (1.5, 0.5, 0.999), (49.0, 0.5, 0.01), (3.0, 0.5, 0.6)])
def test_regularized_beta_equals_scipy(a: float, b: float, x: float) -> None:
    assert regularized_beta(a, b, x) == pytest.approx(float(betainc(a, b, x)), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("seed", range(40))
def test_spearman_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 400))
    a = rng.integers(0, 8, n).astype(float) if seed % 2 else rng.normal(size=n)  # with ties
    b = np.round(a * rng.normal() + rng.normal(size=n) * rng.uniform(0.1, 3), 1)
    ours = spearman_with_loss(a, b)
    rho, p_value = spearmanr(a, b)
    assert ours is not None and ours["n"] == n
    assert ours["rho"] == pytest.approx(rho, abs=1e-12)
    assert ours["p_value"] == pytest.approx(p_value, rel=1e-8, abs=1e-300)


def test_undefined_and_perfect_cases() -> None:
    assert spearman_with_loss(np.array([1.0, 2.0]), np.array([2.0, 1.0])) is None
    assert spearman_with_loss(np.ones(5), np.arange(5.0)) is None
    perfect = spearman_with_loss(np.arange(6.0), -np.arange(6.0) ** 3)
    assert perfect == {"rho": -1.0, "p_value": 0.0, "n": 6}


def test_ranking_imports_neither_torch_nor_scipy() -> None:
    code = (
        "import sys; import protocol.ranking; "
        "assert not {'torch', 'scipy'} & set(sys.modules), 'torch or scipy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

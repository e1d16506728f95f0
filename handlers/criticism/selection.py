"""The math of prototype and criticism selection, on plain numpy arrays (no torch).

The RQ workers gather embeddings, probabilities and steps-to-flip from TorchServe and
select here, so this module imports numpy only.

* MMD-critic (Kim et al. 2016; paper 000, section 2, equation 3): greedy prototypes
  maximising ``J_b(S)`` and greedy criticisms maximising the absolute witness function
  plus ``lambda * log det K_{C,C}`` (``lambda = 1e-5`` in paper 000, section 3.3). The
  log-determinant gains come from an incremental Cholesky factorisation (one row per
  selected criticism), never from re-inverting ``K_{C,C}``.
* adversarial selection (paper 000, section 3.3): prototypes never flip within ``M``
  IFGSM steps, criticisms flip after the fewest steps.
* probability and random baselines (paper 000, section 3.3).

Every function returns ``(indices, scores)`` pairs as numpy arrays, best first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NEVER = -1
"""Steps-to-flip value of an example that did not flip within ``M`` steps."""

Picked = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- kernel
BLOCK_ROWS = 256
"""Rows of the ``n x n`` distance matrix computed at a time: memory ``O(BLOCK_ROWS * n)``."""

HISTOGRAM_BINS = 1 << 16
"""Bins of the first pass of the exact median of the pairwise distances."""


def _as_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (n, d) embeddings, got shape {x.shape}")
    return x


def squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def squared_distances(x: np.ndarray, sq: np.ndarray, rows: np.ndarray, columns: slice = slice(None)) -> np.ndarray:
    """``||x_i - x_j||^2`` for ``i`` in ``rows`` and ``j`` in ``columns`` (float64, >= 0;
    exactly 0 for ``i = j``); ``sq``: :func:`squared_norms` of ``x``."""
    d2 = sq[rows, None] + sq[None, columns]
    d2 -= 2.0 * (x[rows] @ x[columns].T)
    np.maximum(d2, 0.0, out=d2)
    local = rows - (columns.start or 0)  # column of each row's own example, if in range
    inside = (local >= 0) & (local < d2.shape[1])
    d2[np.flatnonzero(inside), local[inside]] = 0.0
    return d2


def _upper_triangle_blocks(x: np.ndarray, sq: np.ndarray):  # noqa: ANN202 - a generator of arrays
    """The squared distances ``||x_i - x_j||^2`` for ``i < j``, a block of rows at a time."""
    n = x.shape[0]
    for start in range(0, n - 1, BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, n - 1))
        d2 = squared_distances(x, sq, rows, slice(start, n))
        yield d2[np.arange(d2.shape[1])[None, :] > (rows - start)[:, None]]


def median_distance(embeddings: np.ndarray) -> float:
    """Median heuristic: the median distance between distinct examples (1.0 if it is 0).

    Exact (the ``numpy.median`` of all ``n (n - 1) / 2`` distances) without holding them:
    one pass counts the squared distances in :data:`HISTOGRAM_BINS` bins up to a bound on
    the largest, a second keeps only those in the bins of the middle order statistics.
    Memory ``O(BLOCK_ROWS * n)`` (a class of 20,000 images would otherwise need gigabytes).
    """
    x = _as_rows(embeddings)
    n = x.shape[0]
    if n < 2:
        return 1.0
    pairs = n * (n - 1) // 2
    middle = ((pairs - 1) // 2, pairs // 2)  # the order statistics numpy.median averages
    sq = squared_norms(x)
    radius = np.sqrt(squared_norms(x - x.mean(axis=0)).max())
    top = (2.0 * radius) ** 2 * (1.0 + 1e-9)  # >= every squared distance
    if not top > 0 or not np.isfinite(HISTOGRAM_BINS / top):
        return 1.0  # all examples (numerically) equal
    scale = HISTOGRAM_BINS / top
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for d2 in _upper_triangle_blocks(x, sq):
        counts += np.bincount(np.minimum(d2 * scale, HISTOGRAM_BINS - 1).astype(np.int64), minlength=HISTOGRAM_BINS)
    first, last = (int(np.searchsorted(np.cumsum(counts), k, side="right")) for k in middle)
    kept, below = [], 0  # the values in bins first..last, and how many lie in lower bins
    for d2 in _upper_triangle_blocks(x, sq):
        bins = np.minimum(d2 * scale, HISTOGRAM_BINS - 1).astype(np.int64)
        kept.append(d2[(bins >= first) & (bins <= last)])
        below += int(np.count_nonzero(bins < first))
    values = np.sort(np.concatenate(kept))
    low, high = (values[k - below] for k in middle)
    median = float((np.sqrt(low) + np.sqrt(high)) / 2.0)
    return median if median > 0 else 1.0


class RbfKernel:
    """RBF kernel ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` of the rows of ``x``, lazily.

    MMD-critic needs the column sums of the ``n x n`` kernel and a few of its rows (one per
    selected prototype or criticism), not the matrix: the column sums are accumulated a
    block of :data:`BLOCK_ROWS` rows at a time and rows are computed when asked for, so
    memory stays ``O(BLOCK_ROWS * n)`` (the matrix of 20,000 embeddings is 3.2 GB, more
    than a worker's memory limit).

    Args:
        embeddings: ``(n, d)``.
        bandwidth: ``sigma``; ``None`` uses the median heuristic (:func:`median_distance`).
    """

    def __init__(self, embeddings: np.ndarray, bandwidth: float | None = None) -> None:
        self.x = _as_rows(embeddings)
        self.n, self.sq = self.x.shape[0], squared_norms(self.x)
        self.sigma = median_distance(self.x) if bandwidth is None else float(bandwidth)
        self.diagonal = np.ones(self.n)
        self.colsum = np.zeros(self.n)
        for start in range(0, self.n, BLOCK_ROWS):
            self.colsum += self.rows(np.arange(start, min(start + BLOCK_ROWS, self.n))).sum(axis=0)

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(len(indices), n)``: the kernel rows of the given examples."""
        d2 = squared_distances(self.x, self.sq, np.asarray(indices, dtype=np.int64).reshape(-1))
        d2 *= -1.0 / (2.0 * self.sigma * self.sigma)
        return np.exp(d2, out=d2)


# --------------------------------------------------------------------------- MMD-critic
def j_b(kernel: np.ndarray, selected: Sequence[int]) -> float:
    """Paper 000, equation 3.

``J_b(S) = 2/(n|S|) sum_{i in [n], j in S} k_ij - 1/|S|^2 sum_{i, j in S} k_ij``.
"""
    s = np.asarray(selected, dtype=np.int64)
    if s.size == 0:
        return 0.0
    n = kernel.shape[0]
    return float(2.0 * kernel[:, s].sum() / (n * s.size) - kernel[np.ix_(s, s)].sum() / s.size**2)


def mmd_prototypes(kernel: RbfKernel, m: int) -> Picked:
    """Greedy maximisation of ``J_b(S)`` (paper 000, equation 3; Kim et al. 2016, eq. 4).

    Adding ``c`` to ``S`` (``|S| = s``) gives
    ``(s + 1) J_b(S + c) = const + 2 colsum_c / n - (2 sum_{j in S} k_jc + k_cc) / (s + 1)``,
    so one running vector ``sum_{j in S} k_jc`` (updated with one kernel row per pick)
    ranks all candidates in ``O(n)`` per step.

    Returns:
        Indices in the order picked and ``J_b`` of the prototype set after each pick.
    """
    n = kernel.n
    m = min(m, n)
    colsum = kernel.colsum
    colterm = 2.0 * colsum / n
    diag = kernel.diagonal
    to_selected = np.zeros(n)
    free = np.ones(n, dtype=bool)
    picked, values = np.empty(m, dtype=np.int64), np.empty(m)
    cross, within = 0.0, 0.0  # sum_{i in [n], j in S} k_ij and sum_{i, j in S} k_ij
    for s in range(m):
        gain = colterm - (2.0 * to_selected + diag) / (s + 1)
        gain[~free] = -np.inf
        c = int(np.argmax(gain))
        cross += colsum[c]
        within += 2.0 * to_selected[c] + diag[c]
        to_selected += kernel.rows([c])[0]
        free[c] = False
        picked[s] = c
        values[s] = 2.0 * cross / (n * (s + 1)) - within / (s + 1) ** 2
    return picked, values


def witness(kernel: RbfKernel, prototypes: Sequence[int]) -> np.ndarray:
    """Witness function of MMD-critic (Kim et al. 2016, section 3) at every example.

    ``w(x) = 1/n sum_i k(x, x_i) - 1/|S| sum_{j in S} k(x, x_j)``: positive where the data
    are denser than the prototypes, negative where the prototypes over-represent.
    """
    s = np.asarray(prototypes, dtype=np.int64)
    data_term = kernel.colsum / kernel.n
    if s.size == 0:
        return data_term
    return data_term - kernel.rows(s).mean(axis=0)


def mmd_criticisms(kernel: RbfKernel, prototypes: Sequence[int], m: int, lam: float) -> Picked:
    """Greedy criticisms: maximise ``sum_{c in C} |w(c)| + lam * log det K_{C,C}``.

    Kim et al. 2016, equation 5, with the log-determinant diversity regulariser weighted
    by ``lam`` (paper 000, section 3.3: ``lambda = 1e-5``). The gain of candidate ``c`` is
    ``|w(c)| + lam * log(k_cc - k_Cc^T K_CC^-1 k_Cc)`` (the Schur complement, by the
    determinant lemma). ``L^-1 k_Cc`` for all candidates is kept as a matrix that grows by
    one row per pick (incremental Cholesky), so each step costs ``O(|C| n)``.

    Returns:
        Indices in the order picked and their (signed) witness values.
    """
    n = kernel.n
    w = witness(kernel, prototypes)
    free = np.ones(n, dtype=bool)
    free[np.asarray(prototypes, dtype=np.int64)] = False
    m = min(m, int(free.sum()))
    schur = kernel.diagonal.copy()
    rows = np.empty((m, n))  # row t: (L^-1 K_{C,:})[t], C the first t + 1 picks
    picked = np.empty(m, dtype=np.int64)
    tiny = np.finfo(np.float64).tiny
    for t in range(m):
        gain = np.abs(w) + lam * np.log(np.maximum(schur, tiny)) if lam else np.abs(w)
        gain[~free] = -np.inf
        c = int(np.argmax(gain))
        pivot = np.sqrt(max(schur[c], tiny))
        rows[t] = (kernel.rows([c])[0] - rows[:t, c] @ rows[:t]) / pivot
        schur -= rows[t] ** 2
        free[c] = False
        picked[t] = c
    return picked, w[picked]


def mmd_critic(
    embeddings: np.ndarray,
    n_prototypes: int,
    n_criticisms: int,
    bandwidth: float | None = None,
    lam: float = 1e-5,
) -> tuple[Picked, Picked, float]:
    """MMD-critic on ``(n, d)`` embeddings (paper 000, section 2; Kim et al. 2016).

    Returns:
        ``(prototypes, J_b values)``, ``(criticisms, witness values)`` and the bandwidth.
    """
    kernel = RbfKernel(embeddings, bandwidth)
    prototypes = mmd_prototypes(kernel, n_prototypes)
    criticisms = mmd_criticisms(kernel, prototypes[0], n_criticisms, lam)
    return prototypes, criticisms, kernel.sigma


# --------------------------------------------------------------------------- baselines
def adversarial_selection(
    steps_to_flip: Sequence[int | None] | np.ndarray,
    n_prototypes: int,
    n_criticisms: int,
    robustness: Sequence[float] | np.ndarray | None = None,
    include_misclassified: bool = False,
) -> tuple[Picked, Picked]:
    """Adversarial model criticism (paper 000, section 3.3).

    Prototypes are the examples still correctly classified after ``M`` IFGSM steps
    (``steps_to_flip`` None or -1), most robust first; criticisms are the examples that
    flip, fewest steps first. ``robustness`` (e.g. the probability of the true class after
    the ``M`` steps) breaks ties: high first among prototypes, low first among criticisms.
    Examples already misclassified (0 steps) are criticisms only with
    ``include_misclassified``. Pools smaller than requested give fewer items.

    Returns:
        ``(prototypes, steps)`` and ``(criticisms, steps)``; ``steps`` is -1 for never.
    """
    steps = np.array([NEVER if s is None else int(s) for s in steps_to_flip], dtype=np.int64)
    rob = np.zeros(steps.size) if robustness is None else np.asarray(robustness, dtype=np.float64)
    if rob.shape != steps.shape:
        raise ValueError("robustness must have one value per example")
    order = np.arange(steps.size)
    robust = order[steps == NEVER]
    robust = robust[np.lexsort((robust, -rob[robust]))][:n_prototypes]
    first = 0 if include_misclassified else 1
    fragile = order[steps >= first]
    fragile = fragile[np.lexsort((fragile, rob[fragile], steps[fragile]))][:n_criticisms]
    return (robust, steps[robust]), (fragile, steps[fragile])


def probability_selection(
    confidence: Sequence[float] | np.ndarray,
    n_prototypes: int,
    n_criticisms: int,
    high: float = 0.9,
    low: float = 0.1,
) -> tuple[Picked, Picked]:
    """Probability baseline (paper 000, section 3.3): confident prototypes, unsure criticisms.

    Prototypes: probability of the class above ``high`` (most confident first);
    criticisms: below ``low`` (least confident first).
    """
    p = np.asarray(confidence, dtype=np.float64)
    order = np.arange(p.size)
    top = order[p > high]
    top = top[np.lexsort((top, -p[top]))][:n_prototypes]
    bottom = order[p < low]
    bottom = bottom[np.lexsort((bottom, p[bottom]))][:n_criticisms]
    return (top, p[top]), (bottom, p[bottom])


def random_selection(n: int, n_prototypes: int, n_criticisms: int, seed: int) -> tuple[Picked, Picked]:
    """Random baseline (paper 000, section 3.3): a seeded sample without replacement.

    The scores are the draw order.
    """
    draw = np.random.default_rng(seed).permutation(n)
    protos = draw[: min(n_prototypes, n)]
    crits = draw[protos.size : protos.size + n_criticisms]
    return (protos, np.arange(protos.size, dtype=np.float64)), (
        crits,
        np.arange(crits.size, dtype=np.float64),
    )

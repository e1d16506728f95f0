"""The math of prototype and criticism selection, on plain numpy arrays (no torch).

The RQ workers gather embeddings, probabilities and steps-to-flip from TorchServe and
select here, so this module imports numpy only.

* MMD-critic ([Kim2016]; [Stock2018, §2, eq. 3]): greedy prototypes
  maximising ``J_b(S)`` and greedy criticisms maximising the absolute witness function
  plus ``lambda * log det K_{C,C}`` (``lambda = 1e-5`` in [Stock2018, §3.3]). The
  log-determinant gains come from an incremental Cholesky factorisation (one row per
  selected criticism), never from re-inverting ``K_{C,C}``.
* adversarial selection [Stock2018, §3.3]: prototypes never flip within ``M``
  IFGSM steps, criticisms flip after the fewest steps.
* probability and random baselines [Stock2018, §3.3].

Every function returns ``(indices, scores)`` pairs as numpy arrays, best first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

NEVER = -1
"""Steps-to-flip value of an example that did not flip within ``M`` steps."""

Picked = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- kernel
BLOCK_ROWS = 256
"""Rows of the ``n x n`` pairwise matrices computed at a time: memory ``O(BLOCK_ROWS * n)``."""

HISTOGRAM_BINS = 1 << 16
"""Bins of a pass that narrows the bracket of the median of the pairwise distances."""

KEPT_VALUES = 1 << 22
"""Most values (32 MiB) a median pass keeps; a fuller bracket is narrowed by a histogram."""

BRACKET_SPREAD = 5.0
"""Half-width of the sampled bracket, in standard deviations of the sample median's rank."""

MEDIAN_SAMPLE = (1 << 12, 1 << 18)
"""Fewest and most pairs drawn (seeded) to bracket the median before the pass over all
pairs; between them, enough that the bracket holds about an eighth of :data:`KEPT_VALUES`."""


def _as_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (n, d) embeddings, got shape {x.shape}")
    return x


def squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


class PairwiseBlocks:
    """``alpha * ||x_i - x_j||^2`` for the rows of ``x``: single rows, or the upper triangle
    :data:`BLOCK_ROWS` rows at a time.

    The rows are centred first (no distance changes, and the cancellation in
    ``|a|^2 + |b|^2 - 2 a.b`` shrinks), and both norms ride in the one matrix product:
    ``L_i . R_j`` with ``L_i = (-2 alpha x_i, alpha |x_i|^2, alpha)`` and
    ``R_j = (x_j, 1, |x_j|^2)``. Values are clipped to the sign of ``alpha`` and are exactly
    0 for ``i = j``. The blocks of :meth:`upper` share one buffer: a fresh array per block
    comes from ``mmap`` under glibc's default ``malloc`` thresholds (as in an RQ worker) and
    page-faults its memory in again, which made the whole pass several times slower
    (benchmarks/results/adversarial.md).
    """

    def __init__(self, x: np.ndarray, alpha: float) -> None:
        centred = x - x.mean(axis=0)
        sq = squared_norms(centred)[:, None]
        ones = np.ones_like(sq)
        self.left = np.hstack([-2.0 * alpha * centred, alpha * sq, alpha * ones])
        self.right = np.hstack([centred, ones, sq])
        self.alpha = alpha
        self.n = x.shape[0]

    @property
    def largest_norm_squared(self) -> float:
        """``max_i |x_i - mean|^2``: ``4`` times it bounds every squared distance."""
        return float(self.right[:, -1].max())

    @property
    def rounding(self) -> float:
        """A bound on the rounding error of any value: the dot products have ``d + 2``
        terms, each at most ``4 |alpha| max |x_i - mean|^2``; smaller values mean 0."""
        return 4.0 * self.left.shape[1] * np.finfo(np.float64).eps * abs(self.alpha) * self.largest_norm_squared

    def pairs(self, i: np.ndarray, j: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """The values of the pairs ``(i[k], j[k])`` (not clipped), ``chunk`` pairs at a time."""
        return np.concatenate([
            np.einsum("ij,ij->i", self.left[i[s : s + chunk]], self.right[j[s : s + chunk]])
            for s in range(0, len(i), chunk)
        ])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """``(len(indices), n)``: the values of the given rows (a new array)."""
        return self._finish(self.left[indices] @ self.right.T, indices, 0)

    def upper(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, block)`` with ``block[r, c]`` the value of ``i = start + r``,
        ``j = start + c`` for every ``j >= start``; ``block`` is overwritten by the next one."""
        buffer = np.empty(min(BLOCK_ROWS, self.n) * self.n)
        for start in range(0, self.n, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, self.n)
            block = buffer[: (stop - start) * (self.n - start)].reshape(stop - start, self.n - start)
            np.matmul(self.left[start:stop], self.right[start:].T, out=block)
            yield start, stop, self._finish(block, np.arange(start, stop), start)

    def _finish(self, values: np.ndarray, rows: np.ndarray, first_column: int) -> np.ndarray:
        (np.minimum if self.alpha < 0 else np.maximum)(values, 0.0, out=values)
        local = rows - first_column  # column of each row's own example, if in range
        inside = (local >= 0) & (local < values.shape[1])
        values[np.flatnonzero(inside), local[inside]] = 0.0
        return values


class _MedianBracket:
    """One pass of :func:`median_distance` over the squared distances of distinct pairs:
    how many lie below ``lo``, and those in ``[lo, hi)``: kept while there are at most
    :data:`KEPT_VALUES`, else counted in :data:`HISTOGRAM_BINS` equal bins."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.below, self.inside = 0, 0
        self.smallest, self.largest = np.inf, -np.inf
        self.kept: list[np.ndarray] | None = []
        self.counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        """Count a block (NaN marks entries that are not pairs ``i < j``)."""
        self.below += int(np.count_nonzero(values < self.lo))
        within = values[(values >= self.lo) & (values < self.hi)]
        if not within.size:
            return
        self.inside += within.size
        self.smallest, self.largest = min(self.smallest, within.min()), max(self.largest, within.max())
        if self.kept is not None and self.inside <= KEPT_VALUES:
            self.kept.append(within)
            return
        for part in self.kept or []:
            self._count(part)
        self.kept = None
        self._count(within)

    def _count(self, values: np.ndarray) -> None:
        scale = HISTOGRAM_BINS / (self.hi - self.lo)
        bins = np.minimum((values - self.lo) * scale, HISTOGRAM_BINS - 1).astype(np.int64)
        self.counts += np.bincount(bins, minlength=HISTOGRAM_BINS)

    def holds(self, ranks: tuple[int, int]) -> bool:
        return self.below <= ranks[0] and ranks[1] < self.below + self.inside

    def spans_roundings(self) -> bool:
        """Whether the values inside lie within a few roundings of each other."""
        return bool(self.largest - self.smallest <= 16 * np.spacing(self.largest))

    def narrowed(self, ranks: tuple[int, int]) -> tuple[float, float]:
        """The bins holding ``ranks``, widened each side by a bin and by the rounding of
        the bin arithmetic (a few units in the last place of ``hi``)."""
        cumulative = self.below + np.cumsum(self.counts)
        first, last = (int(np.searchsorted(cumulative, k, side="right")) for k in ranks)
        width = (self.hi - self.lo) / HISTOGRAM_BINS
        margin = width + 4 * np.spacing(self.hi)
        return max(self.lo, self.lo + first * width - margin), min(self.hi, self.lo + (last + 1) * width + margin)


def _sampled_bracket(pairs: PairwiseBlocks, count: int, ranks: tuple[int, int]) -> tuple[float, float] | None:
    """``[lo, hi)`` holding the middle squared distances with high probability, from a
    sample of pairs drawn with a fixed seed; ``None`` when there are few pairs.

    The sample median's rank among all pairs has a standard deviation of about
    ``count / (2 sqrt(size))``; the bracket spans :data:`BRACKET_SPREAD` of them each side.
    """
    fewest, most = MEDIAN_SAMPLE
    size = int(min(most, max(fewest, (8.0 * BRACKET_SPREAD * count / KEPT_VALUES) ** 2)))
    if count <= size:
        return None
    rng = np.random.default_rng(0)
    i = rng.integers(0, pairs.n, size)
    j = rng.integers(0, pairs.n - 1, size)
    j += j >= i  # a uniform distinct pair
    sample = np.sort(pairs.pairs(i, j))
    spread = BRACKET_SPREAD * np.sqrt(size) / 2.0
    centre = (ranks[0] + 0.5) / count * size
    lo = sample[max(0, int(centre - spread))]
    hi = sample[min(size - 1, int(centre + spread) + 1)]
    return max(0.0, float(lo)), float(np.nextafter(hi, np.inf))


def median_distance(embeddings: np.ndarray, max_passes: int = 8) -> float:
    """Median heuristic: the median distance between distinct examples (1.0 if it is 0).

    Exact (the ``numpy.median`` of all ``n (n - 1) / 2`` distances, as computed by
    :class:`PairwiseBlocks`) without holding them: a seeded sample of pairs brackets the
    middle values, and one pass over all pairs counts those below the bracket and keeps
    those inside it. Where the sample missed (rare) or the bracket holds more than
    :data:`KEPT_VALUES` (many equal distances), further passes narrow it with a histogram;
    more than that many distances equal up to a few roundings give the smallest of them.
    Memory ``O(BLOCK_ROWS * n)`` (a class of 20,000 images would otherwise need gigabytes).
    """
    x = _as_rows(embeddings)
    n = x.shape[0]
    if n < 2:
        return 1.0
    count = n * (n - 1) // 2
    ranks = ((count - 1) // 2, count // 2)  # the order statistics numpy.median averages
    pairs = PairwiseBlocks(x, 1.0)
    top = 4.0 * pairs.largest_norm_squared * (1.0 + 1e-9)  # > every squared distance
    if not (top > 0 and np.isfinite(top)):
        return 1.0  # all examples (numerically) equal
    lower_triangle = np.tril(np.ones((BLOCK_ROWS, BLOCK_ROWS), dtype=bool))
    lo, hi = _sampled_bracket(pairs, count, ranks) or (0.0, top)
    held = None  # the last bracket that held the middle values
    for _ in range(max_passes):
        bracket = _MedianBracket(lo, hi)
        for start, stop, block in pairs.upper():
            block[:, : stop - start][lower_triangle[: stop - start, : stop - start]] = np.nan
            bracket.add(block)
        if not bracket.holds(ranks):  # the sample missed: every pair is in [0, top)
            lo, hi = 0.0, top
            continue
        held = bracket
        if bracket.kept is not None:
            wanted = [k - bracket.below for k in ranks]
            values = np.partition(np.concatenate(bracket.kept), wanted)
            low, high = values[wanted]
            break
        if bracket.spans_roundings():  # many equal distances, up to rounding
            low = high = bracket.smallest
            break
        lo, hi = bracket.narrowed(ranks)
    else:  # not reached in practice: each narrowing shrinks the bracket 20,000-fold
        low = high = held.smallest if held is not None else top / 4.0
    low, high = (0.0 if value <= pairs.rounding else value for value in (low, high))  # equal examples
    median = float((np.sqrt(low) + np.sqrt(high)) / 2.0)
    return median if median > 0 else 1.0


class RbfKernel:
    """RBF kernel ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` of the rows of ``x``, lazily.

    MMD-critic needs the column sums of the ``n x n`` kernel and a few of its rows (one per
    selected prototype or criticism), not the matrix: the column sums are accumulated over
    the upper triangle (the kernel is symmetric), :data:`BLOCK_ROWS` rows at a time, and
    rows are computed when asked for, so memory stays ``O(BLOCK_ROWS * n)`` (the matrix of
    20,000 embeddings is 3.2 GB, more than a worker's memory limit).

    Args:
        embeddings: ``(n, d)``.
        bandwidth: ``sigma``; ``None`` uses the median heuristic (:func:`median_distance`).
    """

    def __init__(self, embeddings: np.ndarray, bandwidth: float | None = None) -> None:
        x = _as_rows(embeddings)
        self.n = x.shape[0]
        self.sigma = median_distance(x) if bandwidth is None else float(bandwidth)
        self._exponents = PairwiseBlocks(x, -0.5 / self.sigma**2)
        self.diagonal = np.ones(self.n)
        self.colsum = np.zeros(self.n)
        for start, stop, block in self._exponents.upper():
            np.exp(block, out=block)
            self.colsum[start:stop] += block.sum(axis=1)
            self.colsum[stop:] += block[:, stop - start :].sum(axis=0)

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(len(indices), n)``: the kernel rows of the given examples."""
        exponents = self._exponents.rows(np.asarray(indices, dtype=np.int64).reshape(-1))
        return np.exp(exponents, out=exponents)


# --------------------------------------------------------------------------- MMD-critic
def mmd_prototypes(kernel: RbfKernel, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy maximisation of ``J_b(S)`` ([Stock2018, eq. 3]; [Kim2016, eq. 4]).

    Adding ``c`` to ``S`` (``|S| = s``) gives
    ``(s + 1) J_b(S + c) = const + 2 colsum_c / n - (2 sum_{j in S} k_jc + k_cc) / (s + 1)``,
    so one running vector ``sum_{j in S} k_jc`` (updated with one kernel row per pick)
    ranks all candidates in ``O(n)`` per step.

    Returns:
        Indices in the order picked, ``J_b`` of the prototype set after each pick, and the
        sum of the picked kernel rows (what :func:`witness` needs).
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
    return picked, values, to_selected


def witness(kernel: RbfKernel, prototypes: Sequence[int], row_sum: np.ndarray | None = None) -> np.ndarray:
    """Witness function of MMD-critic [Kim2016, §3] at every example.

    ``w(x) = 1/n sum_i k(x, x_i) - 1/|S| sum_{j in S} k(x, x_j)``: positive where the data
    are denser than the prototypes, negative where the prototypes over-represent.
    ``row_sum``: the sum of the prototypes' kernel rows, if already known.
    """
    s = np.asarray(prototypes, dtype=np.int64)
    data_term = kernel.colsum / kernel.n
    if s.size == 0:
        return data_term
    return data_term - (kernel.rows(s).sum(axis=0) if row_sum is None else row_sum) / s.size


def mmd_criticisms(
    kernel: RbfKernel, prototypes: Sequence[int], m: int, lam: float, prototype_row_sum: np.ndarray | None = None
) -> Picked:
    """Greedy criticisms: maximise ``sum_{c in C} |w(c)| + lam * log det K_{C,C}``.

    [Kim2016, eq. 5], with the log-determinant diversity regulariser weighted
    by ``lam`` ([Stock2018, §3.3]: ``lambda = 1e-5``). The gain of candidate ``c`` is
    ``|w(c)| + lam * log(k_cc - k_Cc^T K_CC^-1 k_Cc)`` (the Schur complement, by the
    determinant lemma). ``L^-1 k_Cc`` for all candidates is kept as a matrix that grows by
    one row per pick (incremental Cholesky), so each step costs ``O(|C| n)``.
    ``prototype_row_sum`` (the prototypes' kernel rows summed, as the prototype search has
    them) saves computing those rows again for the witness.

    Returns:
        Indices in the order picked and their (signed) witness values.
    """
    n = kernel.n
    w = witness(kernel, prototypes, prototype_row_sum)
    strength = np.abs(w)
    free = np.ones(n, dtype=bool)
    free[np.asarray(prototypes, dtype=np.int64)] = False
    m = min(m, int(free.sum()))
    schur = kernel.diagonal.copy()
    rows = np.empty((m, n))  # row t: (L^-1 K_{C,:})[t], C the first t + 1 picks
    picked = np.empty(m, dtype=np.int64)
    tiny = np.finfo(np.float64).tiny
    for t in range(m):
        gain = strength + lam * np.log(np.maximum(schur, tiny)) if lam else strength.copy()
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
    """MMD-critic on ``(n, d)`` embeddings ([Stock2018, §2]; [Kim2016]).

    Returns:
        ``(prototypes, J_b values)``, ``(criticisms, witness values)`` and the bandwidth.
    """
    kernel = RbfKernel(embeddings, bandwidth)
    picked, values, row_sum = mmd_prototypes(kernel, n_prototypes)
    criticisms = mmd_criticisms(kernel, picked, n_criticisms, lam, row_sum)
    return (picked, values), criticisms, kernel.sigma


# --------------------------------------------------------------------------- baselines
def adversarial_selection(
    steps_to_flip: Sequence[int | None] | np.ndarray,
    n_prototypes: int,
    n_criticisms: int,
    robustness: Sequence[float] | np.ndarray | None = None,
    include_misclassified: bool = False,
) -> tuple[Picked, Picked]:
    """Adversarial model criticism [Stock2018, §3.3].

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
    """Probability baseline [Stock2018, §3.3]: confident prototypes, unsure criticisms.

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
    """Random baseline [Stock2018, §3.3]: a seeded sample without replacement.

    The scores are the draw order.
    """
    draw = np.random.default_rng(seed).permutation(n)
    protos = draw[: min(n_prototypes, n)]
    crits = draw[protos.size : protos.size + n_criticisms]
    return (protos, np.arange(protos.size, dtype=np.float64)), (
        crits,
        np.arange(crits.size, dtype=np.float64),
    )

"""MMD-critic against a port of the reference code, timed as an RQ worker runs it.

The criticism job's selection runs in an RQ worker: a process with numpy only (no torch)
and glibc's default ``malloc`` settings. This script is that process, so
:mod:`benchmarks.adversarial` runs it as a subprocess on the demo embeddings; it refuses to
run with torch loaded.

    python -m benchmarks.mmd embeddings.npy [--counts 6 50 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.markdown import table
from protocol.criticism import selection as sel


def reference_port(x: np.ndarray, m_protos: int, m_crits: int, sigma: float, lam: float) -> tuple[list[int], list[int]]:
    """A straightforward port of the reference MMD-critic code's loops [Kim2016]."""
    from sklearn.metrics.pairwise import rbf_kernel  # not in a worker: imported after ours ran

    kernel = rbf_kernel(x, gamma=1.0 / (2 * sigma**2))
    n = kernel.shape[0]
    colsum, diag = 2 * kernel.sum(0) / n, np.diagonal(kernel)
    protos: list[int] = []
    for _ in range(m_protos):
        candidates = np.setdiff1d(np.arange(n), protos)
        score = colsum[candidates] - diag[candidates]
        if protos:
            score = colsum[candidates] - (2 * kernel[protos, :][:, candidates].sum(0) + diag[candidates]) / (len(protos) + 1)
        protos.append(int(candidates[np.argmax(score)]))
    crits: list[int] = []
    witness_all = kernel.sum(0) / n - kernel[protos, :].sum(0) / len(protos)
    inverse = None
    for _ in range(m_crits):
        candidates = np.setdiff1d(np.setdiff1d(np.arange(n), protos), crits)
        score = np.abs(witness_all[candidates])
        if inverse is None:
            score = score + lam * np.log(np.abs(diag[candidates]))
        else:
            cross = kernel[crits, :][:, candidates]
            score = score + lam * np.log(np.abs(diag[candidates] - ((inverse @ cross) * cross).sum(0)))
        crits.append(int(candidates[np.argmax(score)]))
        inverse = np.linalg.inv(kernel[crits, :][:, crits])
    return protos, crits


def best_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_mmd(embeddings: np.ndarray, counts: list[int], repeats: int) -> None:
    """One table row per ``m``. Every run of ours comes before any of the port: the port's
    ``n x n`` kernel (32 MB here) makes glibc raise its ``mmap`` threshold for the rest of
    the process, a state a worker's selection does not start from."""
    sigma = sel.median_distance(embeddings)
    t_median, _ = best_seconds(lambda: sel.median_distance(embeddings), repeats)
    ours = {m: best_seconds(lambda m=m: sel.mmd_critic(embeddings, m, m, bandwidth=sigma), repeats) for m in counts}
    rows = []
    for m in counts:
        t_ref, ref = best_seconds(lambda m=m: reference_port(embeddings, m, m, sigma, 1e-5), repeats if m < 100 else 1)
        t_ours, picked = ours[m]
        same = picked[0][0].tolist() == ref[0] and picked[1][0].tolist() == ref[1]  # type: ignore[index]
        rows.append([m, 1000 * t_ours, 1000 * t_ref, t_ref / t_ours, same])
    n, d = embeddings.shape
    title = (f"MMD-critic, {n} embeddings of dimension {d}, numpy-only process, default malloc "
             f"(median-heuristic bandwidth: {1000 * t_median:.0f} ms more)")
    table(title, ["m prototypes = m criticisms", "ours ms", "reference port ms", "speed-up", "same selection"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", type=Path, help="(n, d) float array saved with numpy.save")
    parser.add_argument("--counts", type=int, nargs="*", default=[6, 50, 200])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if "torch" in sys.modules:
        sys.exit("torch is loaded: this would not time what an RQ worker runs")
    bench_mmd(np.load(args.embeddings), args.counts, args.repeats)


if __name__ == "__main__":
    main()

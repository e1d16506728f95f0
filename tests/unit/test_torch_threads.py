"""Torch threads per TorchServe worker: never more threads in total than cores."""

from __future__ import annotations

import pytest

from handlers.torchserve_handler import torch_threads


@pytest.mark.parametrize(
    ("workers", "cores", "expected"),
    [(1, 2, 2), (2, 2, 1), (4, 2, 1), (None, 2, 2), (2, 16, 8), (3, 8, 2), (0, 4, 4)],
)
def test_cores_shared_among_workers(
    monkeypatch: pytest.MonkeyPatch, workers: int | None, cores: int, expected: int
) -> None:
    monkeypatch.delenv("BEYOND_TORCH_THREADS", raising=False)
    assert torch_threads(workers, cores) == expected


def test_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEYOND_TORCH_THREADS", "3")
    assert torch_threads(2, 2) == 3
    monkeypatch.setenv("BEYOND_TORCH_THREADS", "0")
    assert torch_threads(1, 2) == 1

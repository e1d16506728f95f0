"""Sufficient input subsets on a model whose answer we know: it reads one 4x4 patch only.

The model's class-0 logit is ``scale * (mean red of the patch - 0.5)``, class 1's is zero.
With the patch red (1.0) and ``k`` of its 16 pixels shown (masked ones show 0.5 grey, this
model having no normalisation), the class-0 log-odds are ``scale * 0.5 * k / 16``. At
``scale`` 20 the probability reaches 0.9 (log-odds ln 9 = 2.197) with k = 4 pixels: the SIS
is 4 pixels of the patch and nothing else; the patch alone (16 of 256 pixels) is the kept
subset at ``keep_fraction`` 1/16.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from handlers.explainers import explain
from handlers.explainers.sis import log_odds, removal_sizes

PATCH = (slice(6, 10), slice(3, 7))


class PatchReader(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * (x[:, 0, PATCH[0], PATCH[1]].mean(dim=(1, 2)) - 0.5)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def _images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=generator)
    images[:, 0, PATCH[0], PATCH[1]] = 1.0
    return images


def _patch_mask() -> torch.Tensor:
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[PATCH] = True
    return mask


@pytest.mark.parametrize("scale", [20.0, 400.0])  # 400: p rounds to 1.0, its gradient to 0
def test_the_subset_lies_in_the_patch_the_model_reads(scale: float) -> None:
    images = _images()
    params = {"step_fraction": 1 / 256, "keep_fraction": 1 / 16}
    result = explain(PatchReader(scale), images, "sis", params)
    extras, patch = result.extras, _patch_mask()
    assert result.targets.tolist() == [0, 0, 0]
    needed = math.ceil(16 * 2 * math.log(9) / scale)  # log-odds scale * k / 32 >= ln 9
    for b in range(3):
        sis = torch.from_numpy(extras["sis_mask"][b]).bool()
        assert int(sis.sum()) == needed and not (sis & ~patch).any()
        assert extras["sis_fraction"][b] == needed / 256
        assert extras["sis_confidence"][b] == pytest.approx(1 / (1 + math.exp(-scale * needed / 32)), rel=1e-5)
        # the 16 pixels removed last are the patch: the highest relevance, the kept subset
        relevance = result.relevance[b].sum(0)
        assert relevance[patch].min() > relevance[~patch].max()
        assert extras["kept_fraction"][b] == 1 / 16
        assert extras["kept_prediction"][b] == 0 and extras["confident_when_kept"][b]
        assert extras["kept_confidence"][b] == pytest.approx(1 / (1 + math.exp(-scale / 2)), rel=1e-5)
        assert len(extras["confidence"][b]) == len(extras["shown_fraction"][b]) == 256
        assert extras["shown_fraction"][b][0] == 1.0


def test_no_subset_when_the_whole_image_is_below_the_threshold() -> None:
    images = _images()
    images[:, 0, PATCH[0], PATCH[1]] = 0.55  # log-odds 20 * 0.05 = 1: p = 0.73
    result = explain(PatchReader(20.0), images, "sis", {"threshold": 0.9})
    assert result.extras["sis_fraction"] == [None] * 3 and result.extras["sis_mask"].sum() == 0
    assert result.extras["confident_when_kept"] == [False] * 3


def test_log_odds_do_not_saturate() -> None:
    logits = torch.tensor([[120.0, 0.0, 1.0], [0.0, 2.0, 2.0]])
    odds = log_odds(logits, torch.tensor([0, 1]))
    assert odds[0].item() == pytest.approx(120.0 - math.log(1 + math.e), abs=1e-4)
    assert odds[1].item() == pytest.approx(2.0 - math.log(1 + math.exp(2.0)), abs=1e-5)


def test_removal_sizes_cover_every_pixel_once() -> None:
    assert removal_sizes(256, 0.02) == [5] * 51 + [1]
    assert removal_sizes(10, 0.5) == [5, 5] and sum(removal_sizes(4096, 0.013)) == 4096

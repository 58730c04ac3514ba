"""Learning-rate schedules: closed form, and applied identically by every party."""

from __future__ import annotations

import math

import pytest
import torch

from splitunet.schedules import LrSchedule, lr_factor, set_lr
from splitunet.schemas import OptimizerOptions


def test_cosine_with_warmup():
    assert lr_factor("cosine", 1, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor("cosine", 10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor("cosine", 55, 100, warmup_steps=10) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 100, 100, min_factor=0.1) == pytest.approx(0.1)


def test_poly_and_constant():
    assert lr_factor(LrSchedule.POLY, 50, 100) == pytest.approx(0.5**0.9)
    assert lr_factor(LrSchedule.CONSTANT, 50, 100) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor("cosine", 1, 0)


def test_optimizer_options_give_the_rate_of_a_step():
    options = OptimizerOptions(lr=1e-3, schedule="cosine", total_steps=200)
    assert options.lr_at(100) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert OptimizerOptions(lr=1e-3, schedule="cosine").lr_at(100) == 1e-3  # no total_steps: constant
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    set_lr(opt, options.lr_at(200))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

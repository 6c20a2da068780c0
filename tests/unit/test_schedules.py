"""Schedules: warm-up, cosine ends, scaling rule, DINO momentum and temperature."""

from __future__ import annotations

from itertools import pairwise

import pytest

from pipeline.config import DinoConfig, OptimConfig
from pipeline.train.schedules import Schedules, cosine, learning_rate, teacher_temperature


def test_cosine_endpoints_and_midpoint():
    assert cosine(0, 1.0, 0.0) == 1.0
    assert cosine(1, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(2.0, 1.0, 0.2) == pytest.approx(0.2)


def test_learning_rate_warms_up_linearly_then_decays():
    lrs = [learning_rate(s, peak=1.0, min_lr=0.1, warmup=10, total=110) for s in range(111)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(lrs[10:]))
    assert lrs[110] == pytest.approx(0.1)


def test_schedules_from_recipe_sections():
    optim = OptimConfig(lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4,
                        warmup_epochs=2)  # fmt: skip
    dino = DinoConfig(momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                      warmup_teacher_temp_epochs=4)  # fmt: skip
    s = Schedules(optim, dino, steps_per_epoch=10, total_steps=100, global_batch=1024)
    assert s.peak_lr == pytest.approx(5e-4 * 4)  # 1024 / 256
    start, warm, end = s.at(0), s.at(20), s.at(100)
    assert start["lr"] == 0 and warm["lr"] == pytest.approx(s.peak_lr)
    assert end["lr"] == pytest.approx(1e-6)
    assert start["wd"] == pytest.approx(0.04) and end["wd"] == pytest.approx(0.4)
    assert start["momentum"] == pytest.approx(0.996) and end["momentum"] == pytest.approx(1.0)
    assert start["teacher_temp"] == pytest.approx(0.04)
    assert s.at(20)["teacher_temp"] == pytest.approx(0.055)
    assert s.at(60)["teacher_temp"] == pytest.approx(0.07)
    assert "momentum" not in Schedules(optim, None, 10, 100, 256).at(5)


def test_teacher_temperature_without_warmup():
    assert teacher_temperature(0, warmup_temp=0.04, temp=0.07, warmup_epochs=0) == 0.07


def test_rewarm_factor_ramps_from_the_resumed_step_to_one():
    from pipeline.train.schedules import rewarm_factor

    assert [rewarm_factor(s, 10, 4) for s in range(10, 16)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert rewarm_factor(3, 3, 0) == 1.0


def test_step_seeds_are_distinct_for_4096_ranks_over_many_steps():
    from pipeline.train.engine import step_seed

    seeds = {step_seed(0, step, rank) for step in range(0, 2000, 37) for rank in range(4096)}
    assert len(seeds) == 4096 * len(range(0, 2000, 37))
    assert all(0 <= s < 2**63 for s in seeds)  # torch.Generator.manual_seed takes any of them
    # The linear mix alone collided as soon as a rank number reached 1009 (one step's stride).
    assert step_seed(0, 1, 0) != step_seed(0, 0, 1009)
    assert step_seed(5, 7, 3) == 5 * 1_000_003 + 7 * 1009 + 3  # runs resume with their draws

"""Schedules: warm-up, cosine ends, scaling rule, DINO momentum and temperature, each equal to
the official code's arrays; the wsd schedule (warm-up, constant, cool-down)."""

from __future__ import annotations

import math
import textwrap
from itertools import pairwise

import numpy as np
import pytest

from pipeline.config import DinoConfig, OptimConfig, RecipeError, load_recipe
from pipeline.train.schedules import (
    Schedules,
    cosine,
    learning_rate,
    linspace_at,
    teacher_temperature,
)


def official_cosine_scheduler(
    base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0
):
    """facebookresearch/dino utils.cosine_scheduler, verbatim in substance."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters))
    )
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def official_teacher_temp(warmup_temp, temp, warmup_epochs, nepochs):
    """DINOLoss.teacher_temp_schedule of facebookresearch/dino, indexed by the epoch."""
    return np.concatenate(
        (
            np.linspace(warmup_temp, temp, warmup_epochs),
            np.ones(nepochs - warmup_epochs) * temp,
        )
    )


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
    assert s.at(20)["teacher_temp"] == pytest.approx(0.06)  # linspace(.04, .07, 4)[2]
    assert s.at(60)["teacher_temp"] == pytest.approx(0.07)
    assert "momentum" not in Schedules(optim, None, 10, 100, 256).at(5)


def test_teacher_temperature_without_warmup():
    assert teacher_temperature(0, warmup_temp=0.04, temp=0.07, warmup_epochs=0) == 0.07


EPOCHS, STEPS_PER_EPOCH = 3, 7


@pytest.mark.parametrize(
    ("warmup_epochs", "temp_epochs"), [(1, 2), (0, 0), (2, 3), (1, 1), (3, 0), (0, 3)]
)
def test_three_epoch_dino_run_equals_the_official_arrays(warmup_epochs, temp_epochs):
    """lr (linspace warm-up, then cosine), wd and momentum (cosine) and the teacher temperature
    (linspace over epochs, constant within one) at every step, as facebookresearch/dino builds
    them, to 1e-12."""
    optim = OptimConfig(lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4,
                        warmup_epochs=warmup_epochs)  # fmt: skip
    dino = DinoConfig(momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                      warmup_teacher_temp_epochs=temp_epochs)  # fmt: skip
    total = EPOCHS * STEPS_PER_EPOCH
    s = Schedules(optim, dino, STEPS_PER_EPOCH, total, global_batch=1024)
    peak = 5e-4 * 1024 / 256
    want = {
        "lr": official_cosine_scheduler(peak, 1e-6, EPOCHS, STEPS_PER_EPOCH, warmup_epochs),
        "wd": official_cosine_scheduler(0.04, 0.4, EPOCHS, STEPS_PER_EPOCH),
        "momentum": official_cosine_scheduler(0.996, 1, EPOCHS, STEPS_PER_EPOCH),
        "teacher_temp": np.repeat(
            official_teacher_temp(0.04, 0.07, temp_epochs, EPOCHS), STEPS_PER_EPOCH
        ),
    }
    got = {k: np.array([s.at(step)[k] for step in range(total)]) for k in want}
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-12, err_msg=key)
    if warmup_epochs:  # the warm-up's last step is at the peak, as numpy.linspace has it
        assert got["lr"][warmup_epochs * STEPS_PER_EPOCH - 1] == pytest.approx(peak, abs=1e-15)


def test_the_paper_setting_differs_from_a_divide_by_n_warm_up():
    """The issue's numbers: 10 warm-up epochs of a 1024 batch on ImageNet (1251 steps/epoch)."""
    optim = OptimConfig(lr=5e-4, min_lr=1e-6, warmup_epochs=10)
    s = Schedules(optim, DinoConfig(), steps_per_epoch=1251, total_steps=100 * 1251,
                  global_batch=1024)  # fmt: skip
    last = 10 * 1251 - 1
    official = np.linspace(0, 2e-3, 10 * 1251)[last]
    assert s.at(last)["lr"] == official == 2e-3
    assert official - 2e-3 * last / (10 * 1251) > 1e-7  # what dividing by N gave


def test_mae_keeps_its_official_linear_warm_up():
    """MAE's util/lr_sched.adjust_learning_rate: lr x epoch / warmup_epochs at the fractional
    epoch, then the same cosine; MAE schedules have no DINO (schedule_config None)."""
    optim = OptimConfig(lr=1.5e-4, min_lr=0.0, weight_decay=0.05, warmup_epochs=1)
    s = Schedules(optim, None, STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH, global_batch=256)
    for step in range(EPOCHS * STEPS_PER_EPOCH):
        epoch = step / STEPS_PER_EPOCH
        if epoch < 1:
            want = 1.5e-4 * epoch / 1
        else:
            want = 1.5e-4 * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / (EPOCHS - 1)))
        assert s.at(step)["lr"] == pytest.approx(want, rel=0, abs=1e-12)
        assert s.at(step)["wd"] == 0.05


def test_one_step_linspaces_hold_their_start():
    """numpy.linspace(a, b, 1) is [a]: a one-step warm-up stays at 0, a one-epoch temperature
    warm-up spends epoch 0 at the warm-up temperature."""
    assert linspace_at(0, 1, 0.0, 1.0) == 0.0 == np.linspace(0.0, 1.0, 1)[0]
    optim = OptimConfig(lr=5e-4, warmup_epochs=1)
    dino = DinoConfig(warmup_teacher_temp_epochs=1)
    s = Schedules(optim, dino, steps_per_epoch=1, total_steps=3, global_batch=256)
    assert [s.at(i)["lr"] for i in range(2)] == [0.0, 5e-4]
    assert [s.at(i)["teacher_temp"] for i in range(2)] == [0.04, 0.07]


def test_teacher_temperature_per_step_option_ramps_within_the_epoch():
    dino = DinoConfig(warmup_teacher_temp_epochs=2, teacher_temp_per_step=True)
    s = Schedules(OptimConfig(), dino, steps_per_epoch=10, total_steps=40, global_batch=256)
    temps = [s.at(i)["teacher_temp"] for i in range(40)]
    assert temps[5] == pytest.approx(0.04 + 0.03 * 5 / 20)
    assert temps[19] == pytest.approx(0.04 + 0.03 * 19 / 20) and temps[20] == 0.07
    official = Schedules(OptimConfig(), DinoConfig(warmup_teacher_temp_epochs=2), 10, 40, 256)
    assert {official.at(i)["teacher_temp"] for i in range(10)} == {0.04}


def wsd(warmup_epochs=1.0, decay_fraction=0.25, total=40, dino=True, **optim) -> Schedules:
    optim = OptimConfig(lr=4e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4,
                        warmup_epochs=warmup_epochs, schedule="wsd",
                        decay_fraction=decay_fraction, **optim)  # fmt: skip
    return Schedules(optim, DinoConfig() if dino else None, 4, total, global_batch=256)


def test_wsd_warms_up_holds_then_anneals_to_min_over_the_fraction():
    s = wsd()  # 4 warm-up steps, 26 at the peak, a 10-step cool-down (25% of 40)
    assert s.decay_steps == 10
    lrs = [s.at(i)["lr"] for i in range(41)]
    np.testing.assert_allclose(lrs[:4], np.linspace(0, 4e-4, 4), rtol=0, atol=1e-15)
    assert lrs[4:31] == [4e-4] * 27  # exactly at the peak through the cool-down's first step
    assert all(a > b for a, b in pairwise(lrs[30:]))
    for i in range(10):  # the cosine of the official code over the last 10 steps
        want = 1e-6 + 0.5 * (4e-4 - 1e-6) * (1 + math.cos(math.pi * i / 10))
        assert lrs[30 + i] == pytest.approx(want, rel=0, abs=1e-12)
    assert lrs[40] == pytest.approx(1e-6)
    # Weight decay and teacher momentum hold until the cool-down too, then reach their ends.
    values = [s.at(i) for i in range(41)]
    assert {v["wd"] for v in values[:31]} == {0.04} and values[40]["wd"] == pytest.approx(0.4)
    assert {v["momentum"] for v in values[:31]} == {0.996}
    assert values[40]["momentum"] == pytest.approx(1.0)


def test_wsd_before_its_cool_down_does_not_depend_on_the_run_length():
    """A wsd run extended (train.epochs) from a checkpoint before its cool-down follows the
    same curve, then anneals at the new end."""
    short, long = wsd(total=40), wsd(total=80)
    assert all(short.at(i) == long.at(i) for i in range(31))
    assert long.at(31)["lr"] == 4e-4 and long.at(80)["lr"] == pytest.approx(1e-6)
    # Held to the end (decay_fraction 0), then resumed at step 40 of a run twice as long whose
    # cool-down is its second half: the same values up to the resume, then the annealing.
    held, annealed = wsd(decay_fraction=0.0, total=40), wsd(decay_fraction=0.5, total=80)
    assert all(held.at(i) == annealed.at(i) for i in range(41))
    lrs = [annealed.at(i)["lr"] for i in range(40, 81)]
    assert all(a > b for a, b in pairwise(lrs)) and lrs[-1] == pytest.approx(1e-6)


def test_wsd_edge_cases():
    # Without a warm-up it starts at the peak.
    assert wsd(warmup_epochs=0).at(0)["lr"] == 4e-4
    # A cool-down of the whole run after the warm-up is the cosine schedule.
    whole, cos = wsd(decay_fraction=0.9), Schedules(
        OptimConfig(lr=4e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4,
                    warmup_epochs=1.0), DinoConfig(), 4, 40, 256)  # fmt: skip
    assert all(whole.at(i)["lr"] == pytest.approx(cos.at(i)["lr"]) for i in range(41))
    # A fraction larger than what the warm-up leaves (a train.steps run) is cut to it.
    assert wsd(decay_fraction=1.0).decay_steps == 36
    # No cool-down: constant after the warm-up, to the end.
    assert {wsd(decay_fraction=0.0).at(i)["lr"] for i in range(4, 41)} == {4e-4}
    # MAE keeps its linear warm-up under wsd too.
    assert wsd(dino=False).at(2)["lr"] == pytest.approx(4e-4 * 2 / 4)


RECIPE = """
run: {name: test}
data: {train: {shards: data/train}}
model: {backbone: vit_base_patch16}
method: {name: dino}
train: {epochs: 10}
optim: {warmup_epochs: 2, schedule: wsd, decay_fraction: 0.5}
"""


def test_recipe_keys_of_the_schedules(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    recipe = load_recipe(path)
    assert recipe.optim.schedule == "wsd" and recipe.optim.decay_fraction == 0.5
    assert recipe.method.dino.teacher_temp_per_step is False
    with pytest.raises(RecipeError, match=r"optim\.decay_fraction=0\.9"):
        load_recipe(path, ("optim.decay_fraction=0.9",))  # 2 + 9 epochs > 10
    with pytest.raises(RecipeError, match=r"optim.decay_fraction=1.5 must lie in \[0, 1\]"):
        load_recipe(path, ("optim.decay_fraction=1.5",))
    with pytest.raises(RecipeError, match=r"optim\.schedule"):
        load_recipe(path, ("optim.schedule=linear",))
    assert load_recipe(path, ("optim.decay_fraction=0.8",)).optim.decay_fraction == 0.8


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

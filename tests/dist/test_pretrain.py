"""Pretraining end to end on 2 gloo processes: real shards, real DeepSpeed engines, resume.

Each scenario is one process group (a spawn costs seconds), covering a whole story.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from pipeline.config import load_recipe
from pipeline.train.distributed import finish_and_exit, free_port, rank_environ

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "debug"


def _rank_main(rank: int, world_size: int, port: int, recipe_path: str, overrides, run_dir):
    os.environ.update(rank_environ(rank, world_size, port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from pipeline.train.distributed import DistEnv
    from pipeline.train.engine import pretrain

    recipe = load_recipe(recipe_path, overrides)
    pretrain(recipe, DistEnv(rank, rank, world_size), Path(run_dir))
    finish_and_exit()


def run_ranks(world_size: int, recipe: Path, overrides: list[str], run_dir: Path) -> None:
    mp.spawn(
        _rank_main,
        args=(world_size, free_port(), str(recipe), overrides, str(run_dir)),
        nprocs=world_size,
        join=True,
    )


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_mae_zero2_trains_checkpoints_and_resumes(shards, tmp_path):
    run_dir = tmp_path / "run"
    common = [
        f"data.train.shards={shards}",
        "data.workers=1",
        "deepspeed.zero_stage=2",
        "checkpoint.every_steps=4",
        "train.batch_size=8",
    ]
    run_ranks(2, RECIPES / "mae_tiny.yaml", [*common, "train.steps=8"], run_dir)
    first = read_metrics(run_dir)
    assert [m["step"] for m in first] == list(range(1, 9))
    assert all(np.isfinite(m["loss"]) for m in first)
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "committed").read_text().strip().endswith("00000008")

    # As if the run had died after logging step 9: those records go when step 8 resumes.
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({**first[-1], "step": 9}) + "\n")
    # A longer run into the same directory resumes at step 8: no step is trained twice.
    run_ranks(2, RECIPES / "mae_tiny.yaml", [*common, "train.steps=12"], run_dir)
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_dino_zero2_trains_with_teacher_and_monitors(shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"data.train.shards={shards}",
        "data.workers=1",
        "deepspeed.zero_stage=2",
        "train.steps=6",
        "train.batch_size=8",
        "checkpoint.every_steps=6",
    ]
    run_ranks(2, RECIPES / "dino_tiny.yaml", overrides, run_dir)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    for m in metrics:
        assert np.isfinite(m["loss"]) and 0 < m["teacher_entropy"] <= np.log(256) + 1e-3
        assert "kl_to_uniform" in m and "momentum" in m


def test_dino_three_epoch_run_applies_the_official_schedules(shards, tmp_path):
    """The lr, weight decay, teacher momentum and temperature the loop applied at every step of
    a 3-epoch run equal the arrays facebookresearch/dino builds (linspace warm-ups, cosine, the
    temperature per epoch) to 1e-12."""
    from tests.unit.test_schedules import official_cosine_scheduler, official_teacher_temp

    run_dir = tmp_path / "run"
    overrides = [
        f"data.train.shards={shards}", "data.workers=0", "deepspeed.zero_stage=2",
        "train.steps=null", "train.epochs=3", "train.batch_size=8", "checkpoint.every_steps=100",
        "optim.warmup_epochs=1", "method.dino.warmup_teacher_temp_epochs=2",
    ]  # fmt: skip
    run_ranks(2, RECIPES / "dino_tiny.yaml", overrides, run_dir)
    metrics = read_metrics(run_dir)
    per_epoch = 4  # 64 samples, 2 ranks x 8
    assert [m["step"] for m in metrics] == list(range(1, 3 * per_epoch + 1))
    recipe = load_recipe(RECIPES / "dino_tiny.yaml", overrides)
    o, d = recipe.optim, recipe.method.dino
    peak = o.lr * 16 / 256
    want = {
        "lr": official_cosine_scheduler(peak, o.min_lr, 3, per_epoch, warmup_epochs=1),
        "wd": official_cosine_scheduler(o.weight_decay, o.weight_decay_end, 3, per_epoch),
        "momentum": official_cosine_scheduler(d.momentum_teacher, 1, 3, per_epoch),
        "teacher_temp": np.repeat(
            official_teacher_temp(d.warmup_teacher_temp, d.teacher_temp, 2, 3), per_epoch
        ),
    }
    for key, values in want.items():
        got = [m[key] for m in metrics]  # the values applied at the step each line ends
        np.testing.assert_allclose(got, values, rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.slow
def test_mae_zero3_trains(shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"data.train.shards={shards}",
        "data.workers=0",
        "deepspeed.zero_stage=3",
        "train.steps=4",
        "train.batch_size=8",
        "checkpoint.every_steps=4",
    ]
    run_ranks(2, RECIPES / "mae_tiny.yaml", overrides, run_dir)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert (run_dir / "checkpoints" / "committed").is_file()

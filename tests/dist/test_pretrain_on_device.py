"""DINO pretraining with crops cut on the device (`data.crops.on_device=true`, here the CPU): 2
gloo processes, real shards and DeepSpeed engines; a resume replays the same views bitwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.dist.test_pretrain import RECIPES, run_ranks


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards()


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


@pytest.mark.slow
def test_dino_on_device_crops_train_and_resume_bitwise(shards, tmp_path):
    overrides = [
        f"data.train.shards={shards}",
        "data.workers=1",
        "data.crops.on_device=true",
        "deepspeed.zero_stage=2",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.steps=6",
        "checkpoint.every_steps=3",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_ranks(2, RECIPES / "dino_tiny.yaml", overrides, whole)
    expected = losses(whole)
    assert sorted(expected) == list(range(1, 7))
    assert all(np.isfinite(v) for v in expected.values())
    # As if the run had died after committing step 3: the same recipe resumes there.
    shutil.copytree(whole, split)
    shutil.rmtree(split / "checkpoints" / "step-00000006")
    (split / "checkpoints" / "committed").write_text("step-00000003\n")
    run_ranks(2, RECIPES / "dino_tiny.yaml", overrides, split)
    resumed = losses(split)
    assert [resumed[s] for s in range(4, 7)] == [expected[s] for s in range(4, 7)]

"""`train.compile`: compiled transformer blocks train like eager ones (CPU inductor here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def run(shards: str, run_dir: Path, *extra: str) -> tuple[list[dict], str]:
    done = subprocess.run(
        [sys.executable, "tools/launch.py", "recipes/debug/mae_tiny.yaml", "--local",
         "--nproc", "1", f"data.train.shards={shards}", f"run.dir={run_dir.parent}",
         f"run.name={run_dir.name}", "stages=[pretrain]", "data.workers=0", "train.steps=3",
         "deepspeed.zero_stage=2", "log.every_steps=1", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], done.stderr


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses(image_shards, tmp_path):
    shards = image_shards(classes=2, shard_size=8)
    eager, _ = run(shards, tmp_path / "eager")
    compiled, log = run(shards, tmp_path / "compiled", "train.compile=true")
    assert "train.compile: 5 transformer blocks compiled" in log  # 4 encoder + 1 decoder
    for a, b in zip(compiled, eager, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]


def test_compile_under_zero3_is_refused_with_the_reason():
    with pytest.raises(RecipeError, match=r"train\.compile=true with deepspeed\.zero_stage=3"):
        load_recipe(ROOT / "recipes/debug/dino_tiny.yaml",
                    ["train.compile=true", "deepspeed.zero_stage=3"])  # fmt: skip

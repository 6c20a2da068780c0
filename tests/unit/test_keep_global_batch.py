"""The launcher keeps a run's global batch when the number of ranks changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import RecipeError, load_recipe
from pipeline.launch.world import keep_global_batch

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "debug" / "dino_tiny.yaml"


def committed_run(run_dir: Path, global_batch: int, world_size: int) -> None:
    """A run directory whose newest committed checkpoint says what it was trained with."""
    tag = run_dir / "checkpoints" / "step-00000010"
    tag.mkdir(parents=True)
    record = {"tag": tag.name, "step": 10, "world_size": world_size, "zero_stage": 2,
              "files": {}, "progress": {"step": 10, "global_batch": global_batch}}  # fmt: skip
    (tag / "commit.json").write_text(json.dumps(record))
    (run_dir / "checkpoints" / "committed").write_text(tag.name)


def test_accumulation_absorbs_fewer_ranks(tmp_path):
    committed_run(tmp_path, global_batch=64, world_size=8)
    recipe = load_recipe(RECIPE, ["train.batch_size=8"])
    resumed, note = keep_global_batch(recipe, tmp_path, world_size=4)
    assert resumed.train.grad_accum == 2 and resumed.train.batch_size == 8
    assert "train.grad_accum 1 -> 2" in note and "64" in note


def test_same_global_batch_changes_nothing(tmp_path):
    committed_run(tmp_path, global_batch=64, world_size=8)
    recipe = load_recipe(RECIPE, ["train.batch_size=8"])
    assert keep_global_batch(recipe, tmp_path, world_size=8) == (recipe, None)
    assert keep_global_batch(recipe, tmp_path / "fresh", world_size=3) == (recipe, None)


def test_more_ranks_than_the_batch_allows_is_refused_saying_what_to_set(tmp_path):
    committed_run(tmp_path, global_batch=64, world_size=8)
    recipe = load_recipe(RECIPE, ["train.batch_size=8"])
    with pytest.raises(RecipeError, match=r"train\.batch_size=4 train\.grad_accum=1"):
        keep_global_batch(recipe, tmp_path, world_size=16)
    with pytest.raises(RecipeError, match="use a world size that divides 64"):
        keep_global_batch(recipe, tmp_path, world_size=3)


def test_an_accumulation_the_recipe_forbids_is_refused_naming_the_keys(tmp_path):
    committed_run(tmp_path, global_batch=64, world_size=8)
    recipe = load_recipe(RECIPE, ["train.batch_size=8", "train.precision=bf16",
                                  "deepspeed.zero_stage=0"])  # fmt: skip
    with pytest.raises(RecipeError, match="grad_accum"):
        keep_global_batch(recipe, tmp_path, world_size=4)

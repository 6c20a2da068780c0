"""Which recipe changes a run directory accepts (recipe_changes / unsafe_changes / key_source)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import apply_overrides, key_source, load_recipe, unsafe_changes

TINY = Path(__file__).resolve().parents[2] / "recipes" / "debug" / "dino_tiny.yaml"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(TINY, ["data.train.shards=/data/a"])


@pytest.mark.parametrize(
    "override",
    [
        "eval.checkpoint=runs/x",
        "eval.knn.k=[3]",
        "train.steps=40",
        "log.every_steps=5",
        "launch.nproc=4",
        "stages=[knn]",
        "checkpoint.keep=5",
        "data.val.shards=/data/v",
        "data.workers=4",
        "model.grad_checkpointing=true",
        "train.batch_size=4",  # the launcher and the trainer keep the global batch
        "train.grad_accum=2",
        "optim.decay_fraction=0.5",  # a wsd run extended, then annealed
    ],
)
def test_resumable_changes_are_accepted(recipe, override):
    assert unsafe_changes(recipe, apply_overrides(recipe, [override])) == {}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.backbone=vit_small_patch16", "model.backbone"),
        ("model.overrides.depth=2", "model.overrides.depth"),
        ("method.name=mae", "method.name"),
        ("data.train.shards=/data/b", "data.train.shards"),
        ("optim.lr=0.1", "optim.lr"),
        ("optim.schedule=wsd", "optim.schedule"),
        ("train.precision=fp16", "train.precision"),
        ("run.seed=3", "run.seed"),
    ],
)
def test_changes_that_would_corrupt_the_run_are_named(recipe, override, key):
    refused = unsafe_changes(recipe, apply_overrides(recipe, [override, "train.steps=50"]))
    assert key in refused and "train.steps" not in refused


def test_key_source_names_the_file_or_the_command_line():
    assert key_source(TINY, "launch.local") == str(TINY)
    assert key_source(TINY, "launch.local", ["launch.local=false"]) == "<command line>"
    assert key_source(TINY, "run.seed") is not None  # set by the base recipe
    assert key_source(TINY, "launch.qos") is None  # the schema's default

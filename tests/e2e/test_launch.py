"""tools/launch.py as a user runs it: dry runs, recipe errors before anything starts, local mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, str(ROOT / "tools" / "launch.py")]


def launch(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())},
    )  # fmt: skip


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards(classes=2, size=(40, 40), shard_size=8, seed=3)


def test_dry_run_prints_the_allocation_and_submits_nothing(tmp_path):
    out = launch("recipes/dino_vitb16.yaml", "--nodes", "8", "--partition", "gpu", "--account",
                 "vision", "--time", "600", f"run.dir={tmp_path}", "--dry-run")  # fmt: skip
    assert out.returncode == 0, out.stderr
    recipe_text, plan_text = out.stdout.split("---\n")
    plan = json.loads(plan_text)
    assert plan["nodes"] == 8 and plan["tasks_per_node"] == 8 and plan["gpus_per_node"] == 8
    assert plan["slurm_partition"] == "gpu" and plan["slurm_account"] == "vision"
    assert plan["timeout_min"] == 600 and plan["slurm_additional_parameters"]["requeue"] is True
    assert "nodes: 8" in recipe_text and "backbone: vit_base_patch16" in recipe_text
    assert "nothing submitted" in out.stderr
    assert not any(tmp_path.iterdir()), "a dry run wrote into the run directory"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.backbone_size=3", "model.backbone_size"),
        ("train.batch_size=many", "train.batch_size"),
        ("data.crops.global_size=230", "data.crops.global_size"),
    ],
)
def test_bad_recipe_fails_before_anything_starts(tmp_path, override, named):
    out = launch("recipes/dino_vitb16.yaml", "--nodes", "2", f"run.dir={tmp_path}", override)
    assert out.returncode == 2
    assert named in out.stderr and "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_local_mode_trains_checkpoints_and_refuses_another_recipe(shards, tmp_path, nproc):
    common = [f"data.train.shards={shards}", f"run.dir={tmp_path}", "run.name=r",
              "stages=[pretrain]", "train.steps=4", "checkpoint.every_steps=2",
              "log.tensorboard=true"]  # fmt: skip
    out = launch("recipes/debug/dino_tiny.yaml", "--local", "--nproc", str(nproc), *common)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "r"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "committed").read_text().strip() == "step-00000004"
    commit = json.loads((run_dir / "checkpoints" / "step-00000004" / "commit.json").read_text())
    assert commit["world_size"] == nproc
    results = json.loads((run_dir / "results.json").read_text())
    assert results["pretrain"]["pretrain_steps"] == 4

    other = launch("recipes/debug/dino_tiny.yaml", "--local", *common, "optim.lr=0.1")
    assert other.returncode == 2 and "different recipe" in other.stderr

"""Checkpoints taken from anyone: nothing unpickled beyond tensors and plain values, content
digests checked, and recipe strings that reach the job script checked.

Real runs through `tools/launch.py --local` write the checkpoints; the tests then change them as
a careless copy or a hostile colleague would and check what resume, evaluation and export do.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import RecipeError, load_recipe
from pipeline.fileio import file_digest
from pipeline.train.checkpoint import validate

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "debug" / "dino_tiny.yaml"


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "launch.py"), str(RECIPE), "--local", *args],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def common(shards: str, run_dir: Path) -> list[str]:
    return [
        "--nproc", "1", f"data.train.shards={shards}", f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}", "data.workers=0", "stages=[pretrain]",
        "deepspeed.zero_stage=2", "checkpoint.every_steps=2", "checkpoint.keep=3",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards(classes=2, shard_size=8)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shards) -> Path:
    """A DINO run of 4 steps with committed checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trusted") / "run"
    done = launch(*common(shards, run_dir), "train.steps=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    config = dest / "config.yaml"  # the run's own recipe names its directory
    config.write_text(config.read_text().replace(str(run_dir.parent), str(dest.parent)))
    return dest


def newest_tag(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "committed").read_text().strip()


class Marker:
    """Creates a file when unpickled: what a hostile checkpoint would run instead."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def plant(tag: Path, name: str, marker: Path) -> None:
    """Replace one file of a committed tag with a pickle that creates `marker` when loaded, and
    rewrite the commit record's digests to match (a consistent, hostile checkpoint)."""
    import torch

    with open(tag / name, "wb") as f:
        torch.save({"module": Marker(marker), "payload": torch.zeros(3)}, f)
    record = json.loads((tag / "commit.json").read_text())
    size, digest = file_digest(tag / name)
    record["files"][name] = {"size": size, "sha256": digest}
    (tag / "commit.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    "name", ["rank-00000.pt", "shared-teacher.pt", "mp_rank_00_model_states.pt"]
)
def test_a_pickle_in_any_file_is_refused_and_never_runs(finished_run, shards, tmp_path, name):
    run_dir = copy_run(finished_run, tmp_path / "run")
    tag = newest_tag(run_dir)
    marker = tmp_path / "marker"
    plant(tag, name, marker)
    # Pickle itself would run it: the planted file is a real threat, not a broken one.
    assert pickle.loads(pickle.dumps(Marker(tmp_path / "probe"))) is None
    assert (tmp_path / "probe").exists()

    # Resume (the launcher with the run's own recipe: it loads the newest checkpoint).
    resumed = launch(*common(shards, run_dir), "train.steps=4")
    assert resumed.returncode != 0
    assert str(tag / name) in resumed.stderr, resumed.stderr[-3000:]
    assert not marker.exists()

    # `--stage knn` of another run, evaluating this one's checkpoint (the launcher, for real).
    evaluator = tmp_path / "evaluator"
    knn = launch(*common(shards, evaluator), "--stage", "knn", f"eval.checkpoint={run_dir}",
                 f"data.val.shards={shards}")  # fmt: skip
    assert knn.returncode != 0
    assert str(tag / name) in knn.stderr, knn.stderr[-3000:]
    assert not marker.exists()

    # Export, and --verify.
    for args in ([str(run_dir), str(tmp_path / "out.safetensors")], ["--verify", str(run_dir)]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "export.py"), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2 and str(tag / name) in done.stderr, done.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_a_flipped_byte_falls_back_on_resume_and_fails_export(finished_run, shards, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    tag = newest_tag(run_dir)
    assert tag.name == "step-00000004"
    victim = tag / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    victim.write_bytes(bytes(data))

    for args in ([str(run_dir), str(tmp_path / "out.safetensors")], ["--verify", str(run_dir)]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "export.py"), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stdout
        assert str(victim) in done.stderr and "sha256" in done.stderr, done.stderr

    resumed = launch(*common(shards, run_dir), "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert str(victim) in resumed.stderr  # the warning names the damaged file
    assert "step-00000002 at step 2" in resumed.stderr, resumed.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # 3, 4 trained again
    assert newest_tag(run_dir).name == "step-00000004"
    assert validate(newest_tag(run_dir), "content") is None


def test_verify_passes_an_intact_checkpoint(finished_run):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export.py"), "--verify", str(finished_run)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("{") :])  # after DeepSpeed's notice
    assert report["verified"].endswith("step-00000004") and report["step"] == 4


@pytest.mark.parametrize(
    "override",
    [
        'launch.job_name="a\\nsrun rm -rf ~"',
        'launch.partition="gpu\\r"',
        'launch.sbatch_args=["--reservation=x\\nhostname"]',
        'run.name="run\\n1"',
    ],
)
def test_control_characters_in_script_strings_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(RECIPE, [override])


def test_launch_refuses_a_newline_in_job_name_before_submitting(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "launch.py"), str(RECIPE), "--dry-run",
         f"run.dir={tmp_path}", 'launch.job_name="x\\ntouch /tmp/owned"'],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "launch.job_name" in done.stderr
    assert not (tmp_path / "debug_dino_tiny").exists()

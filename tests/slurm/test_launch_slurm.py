"""tools/launch.py on the real SLURM test bed: 1 and 2 nodes, and a preemption that resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards(classes=2, size=(40, 40), shard_size=8, seed=4)


def submit(bed, *args: str) -> int:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "launch.py"), *args],
        cwd=ROOT, env={**bed.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scancel" in out.stdout and "tail -f" in out.stdout
    return int(out.stdout.split("submitted job ")[1].split(":")[0])


def wait_done(bed, job_id: int, run_dir: Path, timeout: float = 400) -> dict:
    info = bed.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout)
    logs = "\n".join(p.read_text()[-2000:] for p in (run_dir / "slurm").rglob("*.err"))
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs}"
    return info


def recipe_args(shards: str, tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "recipes/debug/dino_tiny.yaml", f"data.train.shards={shards}", f"run.dir={tmp_path}",
        f"run.name={name}", "stages=[pretrain]", "launch.local=false", "launch.cpus_per_task=1",
        "data.workers=0", "launch.time_min=10", *extra,
    ]  # fmt: skip


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("nodes", [1, 2])
def test_job_trains_checkpoints_and_finishes(slurm_bed, shards, tmp_path, nodes):
    args = recipe_args(shards, tmp_path, "r", "train.steps=6", "checkpoint.every_steps=3")
    job = submit(slurm_bed, *args, "--nodes", str(nodes))
    run_dir = tmp_path / "r"
    wait_done(slurm_bed, job, run_dir)
    assert steps_logged(run_dir) == list(range(1, 7))
    assert (run_dir / "checkpoints" / "committed").read_text().strip() == "step-00000006"
    tasks = [json.loads(p.read_text()) for p in sorted((run_dir / "slurm/tasks").glob("*.json"))]
    assert [t["rank"] for t in tasks] == list(range(nodes))
    commit = json.loads((run_dir / "checkpoints/step-00000006/commit.json").read_text())
    assert commit["world_size"] == nodes
    if nodes == 2:  # really two machines: two network namespaces, two addresses
        assert len({t["netns"] for t in tasks}) == 2
        assert len({t["node_name"] for t in tasks}) == 2
        assert all(t["interface"] == "eth0" for t in tasks)


@pytest.mark.parametrize("how", ["requeue", "usr1"])
def test_preempted_job_requeues_resumes_and_finishes(slurm_bed, shards, tmp_path, how):
    """`scontrol requeue` (preemption: SIGTERM, SLURM requeues) or SIGUSR1 (the time-limit
    warning: the job saves and requeues itself) mid-run; the job comes back and finishes."""
    total = 150
    args = recipe_args(shards, tmp_path, "p", f"train.steps={total}",
                       "checkpoint.every_steps=1000")  # fmt: skip
    job = submit(slurm_bed, *args, "--nodes", "2")
    run_dir = tmp_path / "p"
    deadline = time.monotonic() + 300
    while len(steps_logged(run_dir)) < 10:
        assert time.monotonic() < deadline, "the job never got to step 10"
        time.sleep(0.5)
    if how == "requeue":
        slurm_bed.run("scontrol", "requeue", str(job))  # SIGTERM to every task, back in line
    else:
        slurm_bed.run("scancel", "--signal=USR1", str(job))  # what --signal=USR1@S sends
    time.sleep(1.0)
    info = slurm_bed.wait_state(job, {"PENDING", "COMPLETED"}, timeout=60)
    # checkpoint.every_steps=1000: only the stop on SIGTERM can have committed this one.
    saved = (run_dir / "checkpoints" / "committed").read_text().strip()
    assert saved != f"step-{total:08d}", "the job finished before it could be preempted"
    saved_step = int(saved.split("-")[1])
    assert saved_step >= 10
    if info["JobState"] == "PENDING":  # skip the bed's credential wait before the rerun
        slurm_bed.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    info = wait_done(slurm_bed, job, run_dir)
    assert int(info["Restarts"]) >= 1
    steps = steps_logged(run_dir)
    assert steps == list(range(1, total + 1)), "a step was trained twice or skipped"
    tasks = [json.loads(p.read_text()) for p in (run_dir / "slurm/tasks").glob("*.json")]
    assert all(t["restarts"] >= 1 for t in tasks)
    logs = "".join(p.read_text() for p in (run_dir / "slurm").rglob("*_0_log.err"))
    assert f"resumed from {run_dir / 'checkpoints' / saved} at step {saved_step}" in logs

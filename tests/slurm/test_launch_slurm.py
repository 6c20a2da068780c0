"""tools/launch.py on the real SLURM test bed: 1 and 2 nodes; the events of a job's life, as
SLURM sends them: preemption, the time-limit warning, scancel, a rank that fails."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from pipeline.config import load_recipe, save_recipe
from pipeline.data.loader import build_train_loader
from pipeline.data.stream import resolve_shards
from pipeline.launch import slurm
from pipeline.train.checkpoint import validate

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards(classes=2, size=(40, 40), shard_size=8, seed=4)


# Jobs submitted by the test running now: cancelled when it ends, so a failed test leaves no job
# behind (a run that requeues itself at every time limit would otherwise go on for ever).
_SUBMITTED: list[int] = []


@pytest.fixture(autouse=True)
def cancel_leftover_jobs(slurm_bed) -> Iterator[None]:
    yield
    for job in _SUBMITTED:
        slurm_bed.run("scancel", str(job), check=False)
    _SUBMITTED.clear()


def submit(bed, *args: str) -> int:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "launch.py"), *args],
        cwd=ROOT, env={**bed.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scancel" in out.stdout and "tail -f" in out.stdout
    job = int(out.stdout.split("submitted job ")[1].split(":")[0])
    _SUBMITTED.append(job)
    return job


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


def test_preempted_job_requeues_resumes_and_finishes(slurm_bed, shards, tmp_path):
    """`scontrol requeue` mid-run, as preemption with requeue does: SIGTERM to every task, and
    SLURM puts the job back in line itself. The job saves, comes back and finishes."""
    total = 150
    args = recipe_args(shards, tmp_path, "p", f"train.steps={total}",
                       "checkpoint.every_steps=1000")  # fmt: skip
    job = submit(slurm_bed, *args, "--nodes", "2")
    run_dir = tmp_path / "p"
    deadline = time.monotonic() + 300
    while len(steps_logged(run_dir)) < 10:
        assert time.monotonic() < deadline, "the job never got to step 10"
        time.sleep(0.5)
    slurm_bed.run("scontrol", "requeue", str(job))  # SIGTERM to every task, back in line
    slurm_bed.wait_state(job, {"PENDING", "COMPLETED"}, timeout=60)
    # checkpoint.every_steps=1000: only the stop on SIGTERM can have committed this one.
    saved = (run_dir / "checkpoints" / "committed").read_text().strip()
    assert saved != f"step-{total:08d}", "the job finished before it could be preempted"
    saved_step = int(saved.split("-")[1])
    assert saved_step >= 10
    info = run_to_completion(slurm_bed, job, run_dir)
    assert int(info["Restarts"]) == 1  # SLURM's requeue only: rank 0 did not requeue on SIGTERM
    steps = steps_logged(run_dir)
    assert steps == list(range(1, total + 1)), "a step was trained twice or skipped"
    tasks = [json.loads(p.read_text()) for p in (run_dir / "slurm/tasks").glob("*.json")]
    assert all(t["restarts"] >= 1 for t in tasks)
    logs = task_logs(run_dir, job)
    assert f"resumed from {run_dir / 'checkpoints' / saved} at step {saved_step}" in logs[0]
    assert "not requeueing job" in logs[0] and "time limit: requeueing" not in logs[0]


# --------------------------------------------------------------------------------------------
# The job lifecycle with the events SLURM really sends: the time-limit warning the sbatch script
# asks for, scancel, a rank that raises. None of these tests sends a signal by hand.

# A 2-minute limit, warned 60 s before. slurmctld looks every 30 s and signals once the limit is
# less than warning + 30 s away: 28-58 s into the allocation (measured on the bed), when the job
# step runs. Measured: 30-40 steps/s on 1 node, 14-20 on 2, 4-60 s of start-up per allocation
# (the latter under load). The step counts exceed what that first allocation can train on an
# idle machine (~2,200 and ~1,100). A requeued job gets its warning again 15-58 s after it starts
# (in phase with slurmctld's looks), which a loaded machine can spend on start-up alone; so once
# the job has requeued itself at a real limit, `limit_after_requeue` gives the resumed
# allocation a longer one: the test then ends in one requeue, whatever the load.
TIME_LIMIT_MIN = 2
WARNING_S = 60
STEPS = {1: 3000, 2: 1400}
RESUMED_LIMIT_MIN = 15
RESUMED_TIMEOUT_S = 900  # the rest of the run, on a loaded machine (3-4 steps/s on 2 nodes seen)


# States a job passes through on its way to a requeue: SIGNALING while slurmctld delivers the
# time-limit warning (seen on the bed), COMPLETING and REQUEUED as the allocation ends.
ON_ITS_WAY = {"PENDING", "CONFIGURING", "RUNNING", "SIGNALING", "COMPLETING", "REQUEUED"}


def limit_after_requeue(bed, job: int, timeout: float = 180) -> dict:
    """Wait for the job's first requeue (its own, at the time-limit warning), then raise the
    pending job's time limit for the resumed allocation. Returns the job as it was requeued."""
    deadline = time.monotonic() + timeout
    while True:
        info = bed.job(job)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1:
            bed.run("scontrol", "update", f"JobId={job}", f"TimeLimit={RESUMED_LIMIT_MIN}")
            return info
        if info.get("JobState") == "COMPLETED":
            raise AssertionError(f"job {job} finished within one allocation: raise STEPS")
        if info.get("JobState") not in ON_ITS_WAY:
            raise AssertionError(f"job {job} ended before requeueing itself: {info}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} did not requeue itself in {timeout}s: {info}")
        time.sleep(0.5)


def run_to_completion(bed, job: int, run_dir: Path, timeout: float = 420) -> dict:
    """Wait until the job completes, through its requeues. A requeued job waits the bed's
    credential expiry (20 s) before it runs again: starting it earlier (`scontrol update
    StartTime=now`) gets it refused by the node ("already killed, do not launch") and FAILED."""
    deadline = time.monotonic() + timeout
    while True:
        info = bed.job(job)
        state = info.get("JobState")
        if state == "COMPLETED":
            return info
        if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            raise AssertionError(f"job {job} ended {state}: {info}\n{tail_logs(run_dir)}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job} not done after {timeout}s: {info}\n{tail_logs(run_dir)}"
            )
        time.sleep(0.5)


def task_logs(run_dir: Path, job: int) -> dict[int, str]:
    """Each rank's stderr over all of the job's allocations (opened for appending)."""
    folder = run_dir / "slurm" / str(job)
    return {int(p.name.split("_")[1]): p.read_text() for p in folder.glob(f"{job}_*_log.err")}


def tail_logs(run_dir: Path) -> str:
    logs = [*(run_dir / "slurm").rglob("*.err"), *run_dir.glob("*.out")]
    return "\n".join(p.read_text()[-3000:] for p in logs)


def submitted_script(run_dir: Path, job: int) -> str:
    """The sbatch script submitit wrote and submitted."""
    return (run_dir / "slurm" / str(job) / f"{job}_submission.sh").read_text()


def stops(log: str, rank: int | None = None) -> list[tuple[int, str]]:
    """(step, signal) of every stop with a save in a log, in order (of `rank` only if given)."""
    who = r"\S+" if rank is None else str(rank)
    found = re.findall(rf"\[rank {who}\] WARNING \S+: stopped at step (\d+) on (\w+)", log)
    return [(int(step), sig) for step, sig in found]


@pytest.mark.parametrize("nodes", [1, 2])
def test_time_limit_saves_requeues_resumes_and_finishes(slurm_bed, shards, tmp_path, nodes):
    """A real time limit: the warning the sbatch script asks for reaches every rank, they save
    the same step, rank 0 requeues, the job resumes there (under a longer limit, see
    `limit_after_requeue`), and every step is trained once."""
    total = STEPS[nodes]
    args = recipe_args(
        shards, tmp_path, "t", f"train.steps={total}", "checkpoint.every_steps=100000",
        f"launch.time_min={TIME_LIMIT_MIN}", f"launch.sbatch_args=[--signal=USR1@{WARNING_S}]",
    )  # fmt: skip
    job = submit(slurm_bed, *args, "--nodes", str(nodes))
    run_dir = tmp_path / "t"
    script = submitted_script(run_dir, job)
    assert re.findall(r"^#SBATCH --signal=(.*)$", script, re.M) == [f"USR1@{WARNING_S}"]
    assert slurm.TIME_LIMIT_SIGNAL.name == "SIGUSR1"  # the signal the trainer handles
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun.split()
    requeued = limit_after_requeue(slurm_bed, job)
    assert requeued["TimeLimit"] == f"00:{TIME_LIMIT_MIN:02d}:00"  # the limit that was hit
    info = run_to_completion(slurm_bed, job, run_dir, RESUMED_TIMEOUT_S)
    restarts = int(info["Restarts"])
    assert restarts == 1
    assert steps_logged(run_dir) == list(range(1, total + 1)), "a step trained twice or skipped"
    logs = task_logs(run_dir, job)
    assert sorted(logs) == list(range(nodes))
    saved = stops(logs[0])
    assert len(saved) == restarts and all(sig == "SIGUSR1" for _, sig in saved), saved
    for rank in range(1, nodes):
        assert stops(logs[rank]) == saved  # every rank saved the same step
    assert logs[0].count("time limit: requeueing job") == restarts
    for step, _ in saved:
        tag = run_dir / "checkpoints" / f"step-{step:08d}"
        assert f"resumed from {tag} at step {step}" in logs[0]
    assert "Caught signal" not in logs[0]  # submitit's own handler never ran
    final = json.loads((run_dir / "checkpoints" / f"step-{total:08d}" / "commit.json").read_text())
    assert final["world_size"] == nodes


def test_scancel_ends_the_job_for_good_with_a_checkpoint(slurm_bed, shards, tmp_path):
    """`scancel` (SIGTERM to every task, no requeue): the ranks save, nobody requeues."""
    args = recipe_args(shards, tmp_path, "c", "train.steps=100000",
                       "checkpoint.every_steps=100000")  # fmt: skip
    job = submit(slurm_bed, *args, "--nodes", "2")
    run_dir = tmp_path / "c"
    deadline = time.monotonic() + 300
    while len(steps_logged(run_dir)) < 10:
        assert time.monotonic() < deadline, f"the job never got to step 10\n{tail_logs(run_dir)}"
        time.sleep(0.5)
    slurm_bed.run("scancel", str(job))
    info = slurm_bed.wait_state(job, {"CANCELLED"}, timeout=30)
    # Still listed as CANCELLED, never requeued, once every task is gone (KillWait is 10 s).
    deadline = time.monotonic() + 30
    while slurm_bed.run("squeue", "-h", "-j", str(job), check=False).strip():
        assert time.monotonic() < deadline, "the job's tasks did not end"
        time.sleep(0.5)
    info = slurm_bed.job(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    # checkpoint.every_steps=100000: the save at the SIGTERM is the only commit.
    committed = (run_dir / "checkpoints" / "committed").read_text().strip()
    assert validate(run_dir / "checkpoints" / committed) is None
    step = int(committed.split("-")[1])
    assert step >= 10 and steps_logged(run_dir)[-1] == step
    logs = task_logs(run_dir, job)
    assert stops(logs[0]) == stops(logs[1]) == [(step, "SIGTERM")]
    assert f"not requeueing job {job}" in logs[0] and "time limit: requeueing" not in logs[0]


def corrupt_sample(shards: Path, gid: int) -> tuple[Path, int, bytes]:
    """Overwrite the image bytes of sample `gid` with zeros in place (the tar stays readable, the
    JPEG does not decode); returns (shard, offset, original bytes) to repair it with."""
    ref = next(r for r in resolve_shards(str(shards)) if r.offset <= gid < r.offset + r.samples)
    with tarfile.open(ref.url) as tar:
        members = [m for m in tar.getmembers() if m.isreg()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    key = keys[gid - ref.offset]
    image = next(m for m in members if m.name.startswith(f"{key}.") and m.name.endswith("jpg"))
    with open(ref.url, "r+b") as f:
        f.seek(image.offset_data)
        original = f.read(image.size)
        f.seek(image.offset_data)
        f.write(bytes(image.size))
    return Path(ref.url), image.offset_data, original


def test_a_failing_rank_ends_the_job_and_a_relaunch_resumes(slurm_bed, image_shards, tmp_path):
    """Rank 1 meets an undecodable image at step 6 (`data.max_bad_fraction=0`: a real DataError
    on that rank alone) while rank 0 waits in the step's all-reduce. The job ends within seconds,
    the log names the rank, the error and the last commit; fixed data and a relaunch resume."""
    data = tmp_path / "data"
    shutil.copytree(image_shards(classes=2, per_class=64, size=(40, 40), shard_size=16), data)
    total, every, failing = 12, 2, 6  # 8 steps per epoch: the failure comes in the first
    args = recipe_args(str(data), tmp_path, "f", f"train.steps={total}",
                       f"checkpoint.every_steps={every}", "data.max_bad_fraction=0")  # fmt: skip
    # Which samples rank 1 reads at that step: ask the loader the job will run.
    recipe = load_recipe(ROOT / args[0], args[1:])
    loader = build_train_loader(
        recipe.data, method="dino", stride=8, batch_size=recipe.train.batch_size,
        rank=1, world_size=2, seed=recipe.run.seed,
    )  # fmt: skip
    ids = next(b["id"] for i, b in enumerate(loader, 1) if i == failing)
    shard, offset, original = corrupt_sample(data, int(ids[ids >= 0][0]))

    job = submit(slurm_bed, *args, "--nodes", "2")
    run_dir = tmp_path / "f"
    info = slurm_bed.wait_state(job, {"FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"}, 300)
    logs = task_logs(run_dir, job)
    assert info["JobState"] == "FAILED", f"{info}\n{tail_logs(run_dir)}"
    committed = run_dir / "checkpoints" / f"step-{(failing - 1) // every * every:08d}"
    pattern = (r"^(\S+ \S+) \[rank 1\] CRITICAL pipeline\.stages: rank 1 of 2 failed; "
               rf"last committed checkpoint: {re.escape(str(committed))}$")  # fmt: skip
    failed = re.search(pattern, logs[1], re.M)
    assert failed, logs[1][-4000:]
    assert re.search(r"DataError: 1 bad samples in epoch \d+ on rank 1 exceed", logs[1])
    error_at = datetime.strptime(failed[1], "%Y-%m-%d %H:%M:%S,%f")
    gone_after = (datetime.fromisoformat(info["EndTime"]) - error_at).total_seconds()
    assert gone_after < 60, f"the job ended {gone_after:.0f} s after the error"
    assert (run_dir / "checkpoints" / "committed").read_text().strip() == committed.name
    assert validate(committed) is None  # the committed checkpoint is intact
    assert steps_logged(run_dir) == list(range(1, failing))

    with open(shard, "r+b") as f:  # the data is repaired; the same launch resumes
        f.seek(offset)
        f.write(original)
    again = submit(slurm_bed, *args, "--nodes", "2")
    info = run_to_completion(slurm_bed, again, run_dir)
    assert info["Restarts"] == "0"
    assert steps_logged(run_dir) == list(range(1, total + 1)), "a step trained twice or skipped"
    step = int(committed.name.split("-")[1])
    assert f"resumed from {committed} at step {step}" in task_logs(run_dir, again)[0]


def test_sbatch_template_requeues_at_the_time_limit(slurm_bed, shards, tmp_path):
    """slurm/sbatch_template.sh submitted with plain sbatch (2 nodes, a 2-minute limit): the
    same warning, the same save on every rank, the job requeues itself, resumes and finishes."""
    # (The resumed allocation gets a longer limit, as in the launcher's test.)
    template = ROOT / "slurm" / "sbatch_template.sh"
    script = template.read_text()
    assert re.findall(r"^#SBATCH --signal=(.*)$", script, re.M) == ["USR1@120"]
    assert re.search(r"^exec srun --kill-on-bad-exit=1 python -m pipeline\.stages ", script, re.M)
    total = STEPS[2]
    recipe = load_recipe(ROOT / "recipes/debug/dino_tiny.yaml", [
        f"data.train.shards={shards}", f"run.dir={tmp_path}", "run.name=s", "stages=[pretrain]",
        "data.workers=0", f"train.steps={total}", "checkpoint.every_steps=100000",
    ])  # fmt: skip
    run_dir = tmp_path / "s"
    run_dir.mkdir()
    save_recipe(recipe, run_dir / "config.yaml")  # what tools/launch.py writes
    out = run_dir / "job.out"
    # Command-line options win over the #SBATCH lines: the bed's size and a short limit; the
    # warning keeps the template's signal, with a delay that fits a 2-minute job.
    job = slurm_bed.sbatch(
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--time={TIME_LIMIT_MIN}",
        f"--signal=USR1@{WARNING_S}", f"--output={out}", "--export=ALL,OMP_NUM_THREADS=1",
        str(template), str(run_dir),
    )  # fmt: skip
    _SUBMITTED.append(job)
    requeued = limit_after_requeue(slurm_bed, job)
    assert requeued["TimeLimit"] == f"00:{TIME_LIMIT_MIN:02d}:00"  # the limit that was hit
    info = run_to_completion(slurm_bed, job, run_dir, RESUMED_TIMEOUT_S)
    restarts = int(info["Restarts"])
    log = out.read_text()
    assert restarts == 1
    assert steps_logged(run_dir) == list(range(1, total + 1)), "a step trained twice or skipped"
    saved = stops(log, rank=0)
    assert len(saved) == restarts and all(sig == "SIGUSR1" for _, sig in saved), saved
    assert stops(log, rank=1) == saved  # every rank saved the same step
    assert log.count("time limit: requeueing job") == restarts
    for step, _ in saved:
        tag = run_dir / "checkpoints" / f"step-{step:08d}"
        assert f"resumed from {tag} at step {step}" in log
    final = json.loads((run_dir / "checkpoints" / f"step-{total:08d}" / "commit.json").read_text())
    assert final["world_size"] == 2

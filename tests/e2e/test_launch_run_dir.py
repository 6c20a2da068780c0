"""tools/launch.py and the run directory, as a user drives it: one writer at a time (a kill -9
leaves a stale lock that the next launch takes over and resumes from), the changes a finished
run accepts (an evaluation, a longer schedule) and those it refuses, checks made before
anything is submitted, and which mode runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, str(ROOT / "tools" / "launch.py")]
TINY = str(ROOT / "recipes" / "debug" / "dino_tiny.yaml")
ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())}


def launch(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCH, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**ENV, **(env or {})},
    )  # fmt: skip


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards(classes=2, size=(40, 40), shard_size=8, seed=3)


def common(shards: str, tmp_path: Path) -> list[str]:
    return [
        "--local", "--nproc", "1", f"data.train.shards={shards}", f"data.val.shards={shards}",
        f"run.dir={tmp_path}", "run.name=r", "stages=[pretrain]", "checkpoint.every_steps=2",
        "data.workers=0",
    ]  # fmt: skip


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]


def committed(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "committed"
    return pointer.read_text().strip() if pointer.is_file() else None


@pytest.mark.slow
def test_second_launch_is_refused_then_takes_over_after_kill_9_and_resumes(shards, tmp_path):
    args = common(shards, tmp_path)
    run_dir = tmp_path / "r"
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - the launcher writes it while we wait
    first = subprocess.Popen(
        [*LAUNCH, TINY, *args, "train.steps=100000"], cwd=ROOT, env=ENV, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while committed(run_dir) is None:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)

        second = launch(TINY, *args, "train.steps=100000", timeout=60)
        assert second.returncode == 2, second.stderr
        lines = error_lines(second)
        assert len(lines) == 1, second.stderr
        assert f"is in use by pid {first.pid} on host" in lines[0], lines[0]
        assert "(local launch)" in lines[0] and f"kill {first.pid}" in lines[0]

        ranks = psutil.Process(first.pid).children(recursive=True)
        os.kill(first.pid, signal.SIGKILL)  # the launcher alone: its ranks die with it
        first.wait()
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log.close()
    tag = committed(run_dir)
    saved = int(tag.split("-")[1])

    # Relaunch, with a schedule ending two steps after the commit (train.steps may change).
    again = launch(TINY, *args, f"train.steps={saved + 2}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.startswith("local mode: --local\n"), again.stderr[:300]
    assert f"warning: taking over the stale lock of pid {first.pid}" in again.stderr
    assert re.search(rf"resumed from \S*{tag} at step {saved}\b", again.stderr), again.stderr
    assert metrics_steps(run_dir) == list(range(1, saved + 3))
    assert committed(run_dir) == f"step-{saved + 2:08d}"
    assert not (run_dir / "launch.lock").exists()  # released at the end of a local run


@pytest.mark.slow
def test_finished_run_accepts_an_evaluation_and_a_longer_schedule_but_not_another_model(
    shards, tmp_path
):
    args = common(shards, tmp_path)
    run_dir = tmp_path / "r"
    done = launch(TINY, *args, "train.steps=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed(run_dir) == "step-00000004"

    knn = launch(TINY, *args, "train.steps=4", "--stage", "knn", f"eval.checkpoint={run_dir}")
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert f"eval.checkpoint changed, None -> {run_dir}" in knn.stderr
    assert "knn" in json.loads((run_dir / "results.json").read_text())

    longer = launch(TINY, *args, "train.steps=6")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "train.steps changed, 4 -> 6" in longer.stderr
    assert re.search(r"resumed from \S*step-00000004 at step 4\b", longer.stderr), longer.stderr
    assert metrics_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert committed(run_dir) == "step-00000006"
    assert "steps: 6" in (run_dir / "config.yaml").read_text()  # the accepted recipe

    config = (run_dir / "config.yaml").read_text()
    other = launch(TINY, *args, "train.steps=6", "model.backbone=vit_small_patch16")
    assert other.returncode == 2
    lines = error_lines(other)
    assert len(lines) == 1 and "different recipe: model.backbone" in lines[0], other.stderr
    assert "vit_tiny_patch8 -> vit_small_patch16" in lines[0]
    assert (run_dir / "config.yaml").read_text() == config


def test_missing_shard_folder_fails_at_once_naming_it(tmp_path):
    start = time.monotonic()
    out = launch(TINY, f"run.dir={tmp_path}", f"data.train.shards={tmp_path / 'nope'}")
    assert out.returncode == 2 and time.monotonic() - start < 30
    assert error_lines(out) == [f"error: data.train.shards={tmp_path / 'nope'}: no such shard "
                                "folder or file"]  # fmt: skip
    assert not any(tmp_path.iterdir())


NOWHERE_CONF = """ClusterName=nowhere
SlurmctldHost=nowhere(127.0.0.1)
SlurmctldPort=9
NodeName=n1 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1 Default=YES
"""


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs SLURM's sbatch")
@pytest.mark.parametrize("tools", ["sbatch+scontrol", "sbatch only"])
def test_sbatch_without_a_reachable_controller_fails_in_seconds_in_one_line(
    shards, tmp_path, tools
):
    """A real sbatch whose controller does not answer: caught by `scontrol ping` before
    submitting, or (no scontrol on PATH) reported from sbatch's own message."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(NOWHERE_CONF)
    env = {"SLURM_CONF": str(conf)}
    if tools == "sbatch only":
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("sbatch", "srun"):  # submitit looks for srun too
            (bin_dir / tool).symlink_to(shutil.which(tool))
        env["PATH"] = str(bin_dir)
    run_root = tmp_path / "runs"
    start = time.monotonic()
    out = launch(TINY, "launch.local=false", f"run.dir={run_root}", f"data.train.shards={shards}",
                 f"data.val.shards={shards}", env=env, timeout=120)  # fmt: skip
    took = time.monotonic() - start
    assert out.returncode != 0 and took < 30, (took, out.stderr)
    lines = error_lines(out)
    assert "Traceback" not in out.stderr
    if tools == "sbatch+scontrol":
        assert lines == [
            "error: the SLURM controller does not answer (scontrol ping: Slurmctld(primary) at "
            "nowhere is DOWN); nothing submitted"
        ]
        assert not run_root.exists()
    else:
        assert lines[0].startswith("SLURM mode: launch.local is false and sbatch is ")
        assert lines[1:] == [
            "error: sbatch failed: Batch job submission failed: Unable to contact slurm "
            "controller (connect failure); nothing submitted"
        ]
        assert not (run_root / "r" / "config.yaml").exists()
        assert not (run_root / "r" / "launch.lock").exists()


def test_nodes_above_one_in_local_mode_is_refused_naming_both(shards, tmp_path):
    out = launch(TINY, "--nodes", "2", f"run.dir={tmp_path}", f"data.train.shards={shards}")
    assert out.returncode == 2
    lines = error_lines(out)
    assert len(lines) == 1 and lines[0].startswith("error: --nodes 2 asks for SLURM nodes")
    assert f"launch.local is true in {TINY}" in lines[0] and "--nproc" in lines[0]
    out = launch(TINY, "--local", "launch.nodes=3", f"run.dir={tmp_path}", "--dry-run")
    assert out.returncode == 2 and "launch.nodes=3 asks for SLURM nodes" in out.stderr
    assert "(--local)" in out.stderr
    assert not any(tmp_path.iterdir())


def test_first_line_says_which_mode_and_why(tmp_path):
    out = launch(TINY, f"run.dir={tmp_path}", "--dry-run")
    assert out.stderr.splitlines()[0] == f"local mode: launch.local is true in {TINY}"
    out = launch(TINY, "launch.local=false", f"run.dir={tmp_path}", "--dry-run",
                 env={"PATH": str(tmp_path)})  # fmt: skip
    assert out.stderr.splitlines()[0] == "local mode: no sbatch on PATH"

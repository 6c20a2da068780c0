"""A run stopped with Ctrl-C on 2 processes and resumed on 1 through the launcher continues the
same run: every sample of every epoch once, the same schedules at every step and sample count,
the same number of epochs. Nothing is edited by hand: the launcher keeps the global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_recipe
from pipeline.train.preemption import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 8  # 64 samples, 2 ranks x 4 per step
EPOCHS = 3


def command(shards: str, run_dir: Path, nproc: int, zero: int) -> list[str]:
    return [
        sys.executable, str(ROOT / "tools" / "launch.py"), "recipes/debug/dino_tiny.yaml",
        "--local", "--nproc", str(nproc), f"data.train.shards={shards}",
        f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", "stages=[pretrain]",
        "data.workers=1", "train.batch_size=4", "train.steps=null", f"train.epochs={EPOCHS}",
        f"deepspeed.zero_stage={zero}", "checkpoint.every_steps=1000", "log.every_steps=1",
        "log.sample_ids=true", "optim.warmup_epochs=1", "method.dino.warmup_teacher_temp_epochs=1",
    ]  # fmt: skip


def start(shards: str, run_dir: Path, nproc: int, zero: int) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}-{nproc}.log", "a")  # noqa: SIM115
    return subprocess.Popen(
        command(shards, run_dir, nproc, zero), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
    )  # fmt: skip


def log_of(run_dir: Path, nproc: int) -> str:
    return (run_dir.parent / f"{run_dir.name}-{nproc}.log").read_text()


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def ids_by_step(run_dir: Path) -> dict[int, list[int]]:
    by_step: dict[int, list[int]] = {}
    for path in sorted(run_dir.glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_step.setdefault(record["step"], []).extend(record["ids"])
    return by_step


@pytest.mark.parametrize("zero", [2, 3])
def test_ctrl_c_on_two_processes_resume_on_one_continues_the_same_run(image_shards, tmp_path, zero):
    """ZeRO-2 carries the AdamW moments over (universal checkpoint); ZeRO-3 cannot reshard them,
    so its learning rate re-warms over the recipe's warm-up from the resumed step."""
    shards = image_shards(seed=3)  # 4 classes x 16 = 64 samples
    reference, run_dir = tmp_path / "reference", tmp_path / "cut"
    ref = start(shards, reference, 2, zero)

    first = start(shards, run_dir, 2, zero)
    deadline = time.monotonic() + 300
    while len(metrics(run_dir)) < 3:
        assert first.poll() is None, log_of(run_dir, 2)[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the launcher and every rank get SIGINT
    assert first.wait(timeout=240) == REQUEUE_EXIT_CODE, log_of(run_dir, 2)[-3000:]
    saved = int((run_dir / "checkpoints" / "committed").read_text().strip().split("-")[1])
    total = EPOCHS * STEPS_PER_EPOCH
    assert 3 <= saved < total

    second = start(shards, run_dir, 1, zero)
    assert second.wait(timeout=400) == 0, log_of(run_dir, 1)[-3000:]
    assert ref.wait(timeout=400) == 0, log_of(reference, 2)[-3000:]
    resumed_log = log_of(run_dir, 1)
    assert "keeping the run's global batch of 8 images per step" in resumed_log
    assert "train.grad_accum 1 -> 2" in resumed_log
    assert load_recipe(run_dir / "config.yaml").train.grad_accum == 2

    # Every sample of every epoch exactly once, across the stop and the change of world size.
    ids = ids_by_step(run_dir)
    assert sorted(ids) == list(range(1, total + 1))
    for epoch in range(EPOCHS):
        steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
        seen = sorted(i for step in steps for i in ids[step])
        assert seen == list(range(64)), f"epoch {epoch}: samples repeated or skipped"

    # The same curves at every step and sample count, and the same number of epochs.
    got, want = metrics(run_dir), metrics(reference)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, total + 1))
    rewarm = STEPS_PER_EPOCH  # optim.warmup_epochs=1
    for a, b in zip(got, want, strict=True):
        for key in ("samples", "epoch", "lr", "wd", "momentum", "teacher_temp"):
            expected = b[key]
            if zero == 3 and key == "lr" and a["step"] > saved:
                expected *= min(1.0, (a["step"] - saved) / rewarm)
            assert a[key] == pytest.approx(expected, rel=1e-12, abs=1e-15), (a["step"], key)
    assert got[-1]["epoch"] == EPOCHS
    assert got[saved]["lr"] != got[0]["lr"]  # the schedules really move over the run

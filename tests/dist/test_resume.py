"""Surviving crashes and preemption, through the real local launcher (torch's elastic agent).

Each run is `python -m pipeline.stages` on 2 gloo ranks, started in its own session so a test
can SIGKILL the launcher (the ranks, in sessions of their own, must follow it) or signal one rank
(SLURM's warning signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from pipeline.config import load_recipe, save_recipe
from pipeline.train.preemption import REQUEUE_EXIT_CODE

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "debug"
HANG_HOOK = Path(__file__).resolve().parent / "hang_before_commit"  # see its sitecustomize.py
TIMEOUT = 240


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards(seed=1)


def make_run(tmp: Path, name: str, shards: str, overrides: list[str], recipe="dino_tiny") -> Path:
    """Resolve a debug recipe into `tmp/name/config.yaml`, as the launcher does."""
    common = [
        f"data.train.shards={shards}",
        "data.workers=1",
        "train.batch_size=8",
        f"run.dir={tmp}",
        f"run.name={name}",
        "stages=[pretrain]",
        "log.sample_ids=true",
    ]
    recipe = load_recipe(RECIPES / f"{recipe}.yaml", [*common, *overrides])
    run_dir = tmp / name
    run_dir.mkdir(parents=True)
    save_recipe(recipe, run_dir / "config.yaml")
    return run_dir


def start(run_dir: Path, nproc: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    code = (
        "import sys, logging; from pathlib import Path; from pipeline.launch.local import "
        "run_local; logging.basicConfig(); "
        f"sys.exit(run_local(Path({str(run_dir / 'config.yaml')!r}), {nproc}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, start_new_session=True,
        stdout=open(run_dir.parent / f"{run_dir.name}.log", "a"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def finish(proc: subprocess.Popen, run_dir: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{run_dir} did not finish: " + _log_tail(run_dir))


def run(run_dir: Path, nproc: int = 2) -> None:
    code = finish(start(run_dir, nproc), run_dir)
    assert code == 0, _log_tail(run_dir)


def _log_tail(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def committed(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "committed"
    return pointer.read_text().strip() if pointer.is_file() else None


def wait_for(predicate, what: str, timeout: float = TIMEOUT, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll)


def sample_ids(run_dir: Path) -> dict[int, list[int]]:
    """Step -> the ids every rank trained on at that step."""
    by_step: dict[int, list[int]] = {}
    for path in sorted(run_dir.glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], []).extend(rec["ids"])
    return by_step


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_is_bitwise(shards, tmp_path):
    """A launcher SIGKILLed while saving step 6, after every shard is written and before the
    commit record: its ranks die with it, `committed` stays on step 3, and the resumed run logs
    exactly the uninterrupted run's losses at every step. A sitecustomize hook parks rank 0 at
    that point, so the kill cannot race a save that a tiny model finishes in milliseconds."""
    overrides = ["deepspeed.zero_stage=2", "train.steps=10", "checkpoint.every_steps=3"]
    reference = make_run(tmp_path, "reference", shards, overrides)
    run(reference)
    killed = make_run(tmp_path, "killed", shards, overrides)

    marker = tmp_path / "parked-before-commit"
    hook = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HANG_HOOK), os.environ.get("PYTHONPATH")])),
        "HANG_BEFORE_COMMIT": "step-00000006",
        "HANG_MARKER": str(marker),
    }
    proc = start(killed, 2, hook)
    wait_for(lambda: marker.exists() or proc.poll() is not None, "rank 0 to reach the commit")
    job = psutil.Process(proc.pid).children(recursive=True)  # ranks and their loader workers
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its agent only
    proc.wait()
    assert marker.exists(), "the job ended before the step-6 commit: " + _log_tail(killed)
    assert len(job) >= 2
    _, alive = psutil.wait_procs(job, timeout=30)  # loader workers poll their parent every 5 s
    assert not alive, f"outlived their agent: {[p.cmdline() for p in alive]}"
    tag6 = killed / "checkpoints" / "step-00000006"
    assert (tag6 / "rank-00000.pt").is_file() and (tag6 / "rank-00001.pt").is_file()
    assert not (tag6 / "commit.json").exists()
    assert committed(killed) == "step-00000003"

    run(killed)
    got, want = metrics(killed), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, 11))
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "teacher_entropy", "kl_to_uniform", "grad_norm"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert sample_ids(killed) == sample_ids(reference)
    teacher = [
        torch.load(r / "checkpoints/step-00000010/shared-teacher.pt") for r in (killed, reference)
    ]
    for name, tensor in teacher[0].items():
        assert torch.equal(tensor, teacher[1][name]), name


@pytest.mark.slow
def test_sigusr1_saves_within_a_step_exits_for_requeue_and_resumes(shards, tmp_path):
    """SIGUSR1 on ONE rank (the other never hears it): both agree, save the same step, exit
    with the requeue status; the next run resumes there and no step is trained twice."""
    run_dir = make_run(
        tmp_path, "preempted", shards,
        ["deepspeed.zero_stage=3", "train.steps=400", "checkpoint.every_steps=1000"],
        recipe="mae_tiny",
    )  # fmt: skip
    proc = start(run_dir, 2)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 3,
             "three logged steps", poll=0.05)  # fmt: skip
    ranks = psutil.Process(proc.pid).children()  # the agent's children; loader workers are theirs
    assert len(ranks) == 2
    at_signal = metrics(run_dir)[-1]["step"]
    ranks[1].send_signal(signal.SIGUSR1)
    assert finish(proc, run_dir) == REQUEUE_EXIT_CODE, _log_tail(run_dir)
    tag = committed(run_dir)
    assert tag is not None
    saved = int(tag.split("-")[1])
    assert at_signal <= saved <= at_signal + 3  # one step after rank 0 logged, plus log lag
    assert metrics(run_dir)[-1]["step"] == saved

    # "Requeue": the same command with a shorter schedule finishes from the saved step.
    recipe = load_recipe(run_dir / "config.yaml", [f"train.steps={saved + 3}"])
    save_recipe(recipe, run_dir / "config.yaml")
    run(run_dir)
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, saved + 4))
    assert committed(run_dir) == f"step-{saved + 3:08d}"


@pytest.mark.slow
def test_two_ranks_to_one_continues_the_epoch(shards, tmp_path):
    """A 2-rank ZeRO-2 checkpoint taken mid-epoch, resumed by 1 rank with the same global batch:
    the epoch's remaining samples are trained exactly once, and the loss stays on course."""
    common = ["deepspeed.zero_stage=2", "checkpoint.every_steps=6"]
    reference = make_run(tmp_path, "ref2", shards, [*common, "train.steps=12"], "mae_tiny")
    run(reference)
    run_dir = make_run(tmp_path, "to1", shards, [*common, "train.steps=6"], "mae_tiny")
    run(run_dir)  # 64 samples / 16 per step: step 6 is half-way through the second epoch
    recipe = load_recipe(run_dir / "config.yaml", ["train.steps=12", "train.batch_size=16"])
    save_recipe(recipe, run_dir / "config.yaml")
    run(run_dir, nproc=1)

    ids = sample_ids(run_dir)
    assert sorted(ids) == list(range(1, 13))
    for epoch in range(3):
        seen = sorted(i for step in range(4 * epoch + 1, 4 * epoch + 5) for i in ids[step])
        assert seen == list(range(64)), f"epoch {epoch}: repeated or skipped samples"
    got = [m["loss"] for m in metrics(run_dir)]
    want = [m["loss"] for m in metrics(reference)]
    # (Steps 1-6 ran under a 6-step schedule; from step 7 on both follow the 12-step one.)
    assert abs(np.mean(got[6:]) - np.mean(want[6:])) < 0.1 * np.mean(want[6:])


def finetune_run(tmp: Path, name: str, shards: str) -> Path:
    """A 2-step MAE pretraining, then a 3-epoch fine-tune (4 steps an epoch on 2 ranks of 8)
    with checkpoints every 3 steps."""
    return make_run(
        tmp, name, shards,
        ["stages=[pretrain,finetune]", "train.steps=2", "deepspeed.zero_stage=2",
         f"data.val.shards={shards}", "eval.finetune.epochs=3", "eval.finetune.batch_size=8",
         "eval.finetune.warmup_epochs=0.5", "eval.finetune.lr=0.05",
         "eval.finetune.layer_decay=0.75", "checkpoint.every_steps=3"],
        recipe="mae_tiny",
    )  # fmt: skip


def kill_before_commit(run_dir: Path, tag: str, tmp: Path) -> None:
    """Start the run on 2 ranks and SIGKILL the job while rank 0 is about to commit `tag`."""
    marker = tmp / f"{run_dir.name}-parked"
    hook = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HANG_HOOK), os.environ.get("PYTHONPATH")])),
        "HANG_BEFORE_COMMIT": tag,
        "HANG_MARKER": str(marker),
    }
    proc = start(run_dir, 2, hook)
    wait_for(lambda: marker.exists() or proc.poll() is not None, f"rank 0 to reach {tag}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"the job ended before committing {tag}: " + _log_tail(run_dir)


def epochs_seen(run_dir: Path, steps_per_epoch: int) -> list[list[int]]:
    ids = sample_ids(run_dir)
    last = max(ids)
    return [
        sorted(i for s in range(e * steps_per_epoch + 1, (e + 1) * steps_per_epoch + 1)
               for i in ids[s])
        for e in range(last // steps_per_epoch)
    ]  # fmt: skip


@pytest.mark.slow
def test_finetune_killed_mid_way_resumes_exactly(shards, tmp_path):
    """The fine-tune runs on the pretraining trainer: SIGKILLed while committing step 9, it
    resumes from step 6 and logs the uninterrupted run's losses and scores at every step."""
    reference = finetune_run(tmp_path, "reference", shards)
    run(reference)
    killed = finetune_run(tmp_path, "killed", shards)
    kill_before_commit(killed, "step-00000009", tmp_path)
    tuned = killed / "finetune"
    assert committed(tuned) == "step-00000006"
    run(killed)
    got, want = metrics(tuned), metrics(reference / "finetune")
    assert [m["step"] for m in got if "loss" in m] == list(range(1, 13))
    assert [m["step"] for m in got if "val_top1" in m] == [4, 8, 12]
    timing = ("images_per_s", "data_time", "mem_gb")
    assert [{k: v for k, v in m.items() if k not in timing} for m in got] == [
        {k: v for k, v in m.items() if k not in timing} for m in want
    ]
    assert sample_ids(tuned) == sample_ids(reference / "finetune")
    assert (
        json.loads((killed / "results.json").read_text())["finetune"]
        == json.loads((reference / "results.json").read_text())["finetune"]
    )


@pytest.mark.slow
def test_finetune_killed_on_two_ranks_resumes_on_one(shards, tmp_path):
    """Resumed by 1 rank, the fine-tune keeps its global batch (2 micro-batches a step), trains
    each sample of every epoch once and finishes its 3 epochs."""
    run_dir = finetune_run(tmp_path, "to1", shards)
    kill_before_commit(run_dir, "step-00000009", tmp_path)
    recipe = load_recipe(run_dir / "config.yaml", ["stages=[finetune]"])
    save_recipe(recipe, run_dir / "config.yaml")
    run(run_dir, nproc=1)
    tuned = run_dir / "finetune"
    got = metrics(tuned)
    assert [m["step"] for m in got if "loss" in m] == list(range(1, 13))
    assert [m["step"] for m in got if "val_top1" in m] == [4, 8, 12]
    assert all(np.isfinite(m["loss"]) for m in got if "loss" in m)
    assert epochs_seen(tuned, 4) == [list(range(64))] * 3
    assert committed(tuned) == "step-00000012"

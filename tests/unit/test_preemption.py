"""Which stop signal requeues the job, and what the SLURM job is submitted with.

The signals are real (sent to this process with os.kill); the SLURM side is the sbatch script
submitit renders from the launcher's parameters, without submitting it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pipeline.config import load_recipe
from pipeline.launch import slurm
from pipeline.train import preemption
from pipeline.train.preemption import StopFlag, hold_stop_signals, requeue_wanted, wants_requeue

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_process_record(monkeypatch):
    """A clean per-process signal record, and the test process's handlers put back after."""
    monkeypatch.setattr(preemption, "_record", preemption._Record())
    saved = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize(
    ("stop", "received", "requeue"),
    [
        ("SIGUSR1", ["SIGUSR1"], True),  # the warning we ask SLURM for
        ("SIGUSR2", ["SIGUSR2"], True),  # submitit's default warning signal
        ("SIGUSR1", [], True),  # another rank got the warning first
        ("SIGTERM", ["SIGTERM"], False),  # scancel; or preemption, which SLURM requeues itself
        ("SIGUSR1", ["SIGUSR1", "SIGTERM"], False),  # cancelled while saving at the warning
        ("SIGINT", ["SIGINT"], False),  # Ctrl-C
        (None, [], False),  # finished, or not stopped by a signal
    ],
)
def test_only_the_time_limit_warning_requeues(stop, received, requeue):
    assert wants_requeue(stop, received) is requeue


def test_stop_flag_takes_the_time_limit_signal_and_a_later_cancel_wins():
    flag = StopFlag()
    try:
        assert not flag.agreed(1)
        os.kill(os.getpid(), slurm.TIME_LIMIT_SIGNAL)
        assert flag.agreed(1) and flag.requested == "SIGUSR1"
        assert requeue_wanted()
        os.kill(os.getpid(), signal.SIGTERM)  # scancel during the save
        assert flag.requested == "SIGTERM"
        assert not requeue_wanted()
    finally:
        flag.close()


def test_submitits_default_signal_is_a_time_limit_warning_too():
    flag = StopFlag()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)  # what submitit's own handler would have taken
        assert flag.agreed(1) and flag.requested == "SIGUSR2"
        assert requeue_wanted()
    finally:
        flag.close()


def test_a_signal_before_training_is_held_and_stops_the_first_step():
    hold_stop_signals()
    os.kill(os.getpid(), signal.SIGUSR1)  # the process survives: noted, not fatal
    os.kill(os.getpid(), signal.SIGTERM)
    flag = StopFlag()
    try:
        assert flag.requested == "SIGTERM"  # the stronger of the two
        assert flag.agreed(1) and not requeue_wanted()
    finally:
        flag.close()
    assert signal.getsignal(signal.SIGTERM) is preemption._note  # held again after training
    assert StopFlag().requested is None  # a held signal counts once


def test_requeue_happens_only_on_rank_0_of_a_slurm_task(monkeypatch):
    flag = StopFlag()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.agreed(1)
    flag.close()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not slurm.requeue_if_timed_out(preemption.REQUEUE_EXIT_CODE, 0)  # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # a local rank inside an allocation
    assert slurm.slurm_job_id() is None
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert slurm.slurm_job_id() == "12345"
    assert not slurm.requeue_if_timed_out(preemption.REQUEUE_EXIT_CODE, 1)  # not rank 0
    assert not slurm.requeue_if_timed_out(0, 0)  # finished
    hold_stop_signals()
    os.kill(os.getpid(), signal.SIGTERM)  # scancel after the stop
    assert not slurm.requeue_if_timed_out(preemption.REQUEUE_EXIT_CODE, 0)  # cancelled


def _sbatch_script(tmp_path: Path, *overrides: str) -> str:
    import submitit

    recipe = load_recipe(
        ROOT / "recipes/debug/dino_tiny.yaml", [f"data.train.shards={tmp_path}", *overrides]
    )
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(**slurm.slurm_parameters(recipe, tmp_path))
    return executor._executor._make_submission_file_text("python -m x", "uid")


def test_sbatch_script_asks_for_the_handled_signal_and_kills_on_a_bad_exit(tmp_path):
    script = _sbatch_script(tmp_path)
    assert "#SBATCH --signal=USR1@120\n" in script
    assert script.count("--signal") == 1
    assert "#SBATCH --requeue\n" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun.split()
    delayed = _sbatch_script(tmp_path, "launch.sbatch_args=[--signal=USR1@75]")
    assert "#SBATCH --signal=USR1@75\n" in delayed


@pytest.mark.parametrize("spec", ["B:USR1@60", "TERM@60", "USR1", "HUP@30"])
def test_a_signal_the_trainer_would_not_handle_is_refused(tmp_path, spec):
    with pytest.raises(ValueError, match="USR1@<seconds>"):
        _sbatch_script(tmp_path, f"launch.sbatch_args=[--signal={spec}]")


def test_a_task_srun_started_takes_its_rank_from_slurm(monkeypatch):
    """slurm/sbatch_template.sh runs `python -m pipeline.stages` under srun: no RANK set there."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.setenv(name, "")  # recorded, so that what the test sets is undone after
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    slurm.adopt_srun_task()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == (
        "3",
        "1",
        "4",
    )
    monkeypatch.setenv("RANK", "0")  # what a launcher set wins
    slurm.adopt_srun_task()
    assert os.environ["RANK"] == "0"

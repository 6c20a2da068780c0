"""One writer per run directory: `RUN_DIR/launch.lock` names who writes there.

The lock is a small JSON file: the SLURM job id (null for a local launch), the host and PID of
the launcher, and the PID's start time (so a recycled PID is not mistaken for the launcher).

- A local launch holds it for the run's duration (the launcher process is the ranks' agent) and
  removes it when the run ends.
- A SLURM launch takes it before submitting (no two launchers submit into one directory), then
  rewrites it with the job id; the job owns it from then on, through requeues, and the next
  launch finds it stale once SLURM no longer lists the job as pending or running.

A lock is stale when its holder is gone: its SLURM job ended or is unknown to `squeue` /
`scontrol show job`, or, for a local launch on this host, its PID is dead (or reused). A stale
lock is taken over with a warning. When liveness cannot be told (another host's PID, SLURM not
answering), the lock counts as live and the message says how to remove it by hand.

Taking or replacing the lock runs under an `flock` on `RUN_DIR/.launch.lock.guard`, so two
launchers that find the same stale lock cannot both take it over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.fileio import write_atomic

log = logging.getLogger(__name__)

LOCK_NAME = "launch.lock"
_GUARD_NAME = ".launch.lock.guard"

# squeue / scontrol states of a job that will not run again (anything else may still write).
_ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


class RunDirBusy(RuntimeError):
    """Another launch or job is (or may be) writing into the run directory."""


@dataclass
class LockInfo:
    """Who holds a run directory."""

    host: str
    pid: int
    pid_started: float | None = None  # psutil create_time of `pid`, to tell a reused PID
    job_id: str | None = None  # SLURM job; None for a local launch (or before the submission)
    since: float = 0.0  # time.time() when taken

    def describe(self) -> str:
        """`SLURM job 123 (submitted from host h, pid 9)` or `pid 9 on host h (local launch)`."""
        if self.job_id:
            return f"SLURM job {self.job_id} (submitted from host {self.host}, pid {self.pid})"
        return f"pid {self.pid} on host {self.host} (local launch)"


def _pid_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def read_lock(run_dir: Path) -> LockInfo | None:
    """The lock in `run_dir`, or None; an unreadable lock file reads as an unknown holder."""
    path = Path(run_dir) / LOCK_NAME
    try:
        data = json.loads(path.read_text())
        return LockInfo(**{k: data.get(k) for k in LockInfo.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # A torn write (the launcher killed mid-write): nobody can be named, nobody holds it.
        return LockInfo(host="?", pid=0)


def _slurm_state(job_id: str) -> tuple[str | None, str]:
    """(state, detail): the job's state per squeue (or scontrol), "" when SLURM no longer knows
    it, None when SLURM cannot be asked (detail says why)."""
    from pipeline.launch.preflight import LaunchError, check_controller

    try:
        check_controller()  # fast; squeue itself retries for ~20 s when nobody answers
    except LaunchError as e:
        return None, str(e).removesuffix("; nothing submitted")
    if shutil.which("squeue"):
        cmd = ["squeue", "-h", "-j", job_id, "-o", "%T"]
    elif shutil.which("scontrol"):
        cmd = ["scontrol", "show", "job", job_id, "-o"]
    else:
        return None, "neither squeue nor scontrol is on PATH"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(cmd)}` did not answer within 30 s"
    text = (out.stdout + out.stderr).strip()
    if "Invalid job id" in text:
        return "", "unknown to SLURM"
    if out.returncode != 0:
        last = text.splitlines()[-1] if text else f"exit status {out.returncode}"
        return None, f"`{' '.join(cmd)}` failed: {last}"
    if cmd[0] == "squeue":
        states = out.stdout.split()
        return (states[0] if states else ""), "not in squeue"
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1], ""
    return "", "no JobState in scontrol's answer"


def holder_alive(info: LockInfo) -> tuple[bool | None, str]:
    """(alive, why): True / False when it can be told, None when it cannot."""
    if info.job_id:
        state, detail = _slurm_state(info.job_id)
        if state is None:
            return None, detail
        if not state or state in _ENDED:
            return False, f"job {info.job_id} {'is ' + state if state else detail}"
        return True, f"job {info.job_id} is {state}"
    if info.pid <= 0:
        return False, "the lock file is unreadable"
    if info.host != socket.gethostname():
        return None, f"pid {info.pid} runs on another host ({info.host}) and cannot be checked here"
    started = _pid_started(info.pid)
    if started is None:
        return False, f"pid {info.pid} is gone"
    if info.pid_started is not None and abs(started - info.pid_started) > 1.0:
        return False, f"pid {info.pid} is another process now"
    return True, f"pid {info.pid} is running"


@contextlib.contextmanager
def _guard(run_dir: Path) -> Iterator[None]:
    """Serialise lock changes between launchers (flock; released by the kernel on death)."""
    fd = os.open(run_dir / _GUARD_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(run_dir: Path, info: LockInfo) -> None:
    write_atomic(run_dir / LOCK_NAME, json.dumps(asdict(info)) + "\n")


def _busy(run_dir: Path, info: LockInfo, alive: bool | None, why: str) -> RunDirBusy:
    """The refusal for a live (alive=True) or unknowable (None) holder."""
    if alive:
        stop = f"scancel {info.job_id}" if info.job_id else f"kill {info.pid}"
        return RunDirBusy(
            f"{run_dir} is in use by {info.describe()}: {why}; wait for it to end or stop it "
            f"({stop}) first"
        )
    return RunDirBusy(
        f"{run_dir} is locked by {info.describe()} and whether it still runs cannot be told "
        f"({why}); if it does not, remove {Path(run_dir) / LOCK_NAME}"
    )


def check_free(run_dir: Path) -> LockInfo | None:
    """Raise RunDirBusy if a live (or unknowable) holder has `run_dir`; returns the stale lock
    found there, if any. Read-only: for dry runs and checks before anything is written."""
    info = read_lock(run_dir)
    if info is None:
        return None
    alive, why = holder_alive(info)
    if alive is not False:
        raise _busy(run_dir, info, alive, why)
    return info


def acquire(run_dir: Path, warn: Callable[[str], None] | None = None) -> LockInfo:
    """Take `run_dir` for this process (no job id yet); a stale lock is taken over, with a
    warning naming its holder (through `warn`, default the log). Raises RunDirBusy when a live
    (or unknowable) holder has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _guard(run_dir):
        old = read_lock(run_dir)
        if old is not None:
            alive, why = holder_alive(old)
            if alive is not False:
                raise _busy(run_dir, old, alive, why)
            (warn or log.warning)(
                f"taking over the stale lock of {old.describe()} in {run_dir}: {why}"
            )
        pid = os.getpid()
        info = LockInfo(socket.gethostname(), pid, _pid_started(pid), None, time.time())
        _write(run_dir, info)
    return info


def set_job(run_dir: Path, info: LockInfo, job_id: str) -> LockInfo:
    """Hand the lock over to a submitted SLURM job (it outlives this launcher)."""
    info = LockInfo(info.host, info.pid, info.pid_started, str(job_id), info.since)
    with _guard(Path(run_dir)):
        _write(Path(run_dir), info)
    return info


def release(run_dir: Path, info: LockInfo) -> None:
    """Remove the lock if it is still `info`'s (a later takeover is left alone)."""
    run_dir = Path(run_dir)
    with _guard(run_dir):
        now = read_lock(run_dir)
        mine = (info.host, info.pid, info.job_id)
        if now is not None and (now.host, now.pid, now.job_id) == mine:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)


@contextlib.contextmanager
def holding(run_dir: Path) -> Iterator[LockInfo]:
    """`acquire` for the length of a block (a local launch), `release` after it."""
    info = acquire(run_dir)
    try:
        yield info
    finally:
        release(run_dir, info)

"""The run-directory lock: live holders refuse, stale ones are taken over (real processes)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.launch.lock import (
    LOCK_NAME,
    RunDirBusy,
    acquire,
    check_free,
    holding,
    read_lock,
    release,
    set_job,
)

NOWHERE_CONF = """ClusterName=nowhere
SlurmctldHost=nowhere(127.0.0.1)
SlurmctldPort=9
NodeName=n1 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1 Default=YES
"""


def _holder_in(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the lock and sleeps; prints 'held' once it holds it."""
    code = (
        "import sys, time; from pipeline.launch.lock import acquire; "
        f"acquire({str(run_dir)!r}); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_holder_is_refused_by_name_and_its_lock_taken_over_after_kill_9(tmp_path, caplog):
    proc = _holder_in(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=rf"pid {proc.pid} on host .*: pid {proc.pid} is run"):
            acquire(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    caplog.set_level(logging.WARNING)
    info = acquire(tmp_path)
    assert info.pid == os.getpid() and info.job_id is None
    assert f"taking over the stale lock of pid {proc.pid}" in caplog.text
    assert f"pid {proc.pid} is gone" in caplog.text
    release(tmp_path, info)
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    # Our own pid, but recorded with another start time: the holder is gone.
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": 1.0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    assert check_free(tmp_path) is not None


def test_unreadable_lock_is_stale_and_another_hosts_pid_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": "a", "pi')  # torn write
    with holding(tmp_path) as info:
        assert read_lock(tmp_path).pid == info.pid
    assert read_lock(tmp_path) is None

    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunDirBusy, match=r"cannot be told .*another host.*remove .*launch.lock"):
        acquire(tmp_path)


def test_release_leaves_a_lock_taken_over_by_another(tmp_path):
    mine = acquire(tmp_path)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "h", "pid": 1, "job_id": "7"}))
    release(tmp_path, mine)
    assert read_lock(tmp_path).job_id == "7"


@pytest.mark.skipif(shutil.which("squeue") is None, reason="needs SLURM's squeue")
def test_job_lock_is_refused_when_slurm_cannot_be_asked(tmp_path, monkeypatch):
    conf = tmp_path / "slurm.conf"
    conf.write_text(NOWHERE_CONF)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    run_dir = tmp_path / "run"
    set_job(run_dir, acquire(run_dir), "4242")
    assert read_lock(run_dir).describe().startswith("SLURM job 4242 (submitted from host")
    with pytest.raises(RunDirBusy, match=r"SLURM job 4242 .*cannot be told.*does not answer"):
        acquire(run_dir)


def _controller_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    return " is UP" in out.stdout


@pytest.mark.skipif(not _controller_up(), reason="needs a reachable SLURM controller")
def test_job_unknown_to_slurm_is_stale(tmp_path, caplog):
    run_dir = tmp_path / "run"
    set_job(run_dir, acquire(run_dir), "987654321")
    caplog.set_level(logging.WARNING)
    acquire(run_dir)
    assert "stale lock of SLURM job 987654321" in caplog.text

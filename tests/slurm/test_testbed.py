"""The SLURM test bed behaves like the cluster the launcher is written for.

Checks the facts the launcher relies on: separate nodes with separate network namespaces and
addresses, TCP between tasks on different nodes through NodeAddr, signals from `scancel` reaching
the tasks (or only the batch shell), and a job that requeues itself coming back under the same id
with SLURM_RESTART_COUNT set. Each test takes a few seconds. Nothing here imports the pipeline.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

# Every job gets a time limit, so a hung test cannot hold the bed for long.
JOB_LIMIT = "--time=2"


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _wait_lines(path: Path, want: dict[str, int], timeout: float = 30) -> list[str]:
    """Poll a file the job appends to until each line in `want` occurs at least that often."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if all(lines.count(line) >= n for line, n in want.items()):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} lacks {want} after {timeout}s: {lines}")
        time.sleep(0.1)


def test_every_node_is_idle_at_its_own_address(slurm_bed):
    want = [(n, "idle", slurm_bed.addrs[n]) for n in sorted(slurm_bed.nodes)]
    deadline = time.monotonic() + 60  # a job another test cancelled may still be completing
    while True:
        out = slurm_bed.run("sinfo", "-h", "-N", "-p", slurm_bed.partition, "-o", "%N %t %o")
        rows = sorted(tuple(line.split()) for line in out.splitlines())
        if rows == want or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert rows == want
    assert len(set(slurm_bed.addrs.values())) == len(slurm_bed.nodes)


def test_two_node_batch_job_runs_in_two_network_namespaces(slurm_bed, tmp_path):
    task = _write(
        tmp_path / "task.py",
        """
        import json, os, socket, subprocess, time

        addrs = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        t0 = time.monotonic()
        try:
            socket.gethostbyname(os.environ["SLURMD_NODENAME"])
        except OSError:
            pass
        print(json.dumps({
            "rank": int(os.environ["SLURM_PROCID"]),
            "node": os.environ["SLURMD_NODENAME"],
            "netns": os.readlink("/proc/self/ns/net"),
            "addrs": addrs,
            "hostname": socket.gethostname(),
            "lookup_s": time.monotonic() - t0,
        }), flush=True)
        """,
    )
    script = _write(
        tmp_path / "job.sh",
        f"""
        #!/bin/bash
        srun {sys.executable} {task}
        """,
    )
    out = tmp_path / "job.out"
    # Not `sbatch --wait`: it polls with growing sleeps and turns a 1 s job into a 10 s test.
    job = slurm_bed.sbatch(
        "-N2", "--ntasks-per-node=1", JOB_LIMIT, f"--output={out}", f"--chdir={tmp_path}",
        str(script),
    )  # fmt: skip
    info = slurm_bed.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert info["JobState"] == "COMPLETED", (info, out.read_text())
    records = sorted(
        (json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")),
        key=lambda r: r["rank"],
    )
    assert [r["rank"] for r in records] == [0, 1], out.read_text()
    nodes = [r["node"] for r in records]
    assert len(set(nodes)) == 2 and set(nodes) <= set(slurm_bed.nodes)
    namespaces = {r["netns"] for r in records}
    assert len(namespaces) == 2 and os.readlink("/proc/self/ns/net") not in namespaces
    for r in records:
        assert r["addrs"] == [slurm_bed.addrs[r["node"]]]
        # The nodes have no route beyond the bed's subnet, so a name missing from /etc/hosts
        # fails at once instead of waiting on an unreachable DNS server.
        assert r["lookup_s"] < 3, r


def test_tcp_between_tasks_on_two_nodes(slurm_bed, tmp_path):
    # Task 0 listens on its node's NodeAddr (what the launcher will use as MASTER_ADDR); task 1,
    # in the other node's namespace, connects to it and the two exchange a message each way.
    task = _write(
        tmp_path / "tcp.py",
        """
        import os, socket, subprocess, time

        def node_addr(name):
            out = subprocess.run(["scontrol", "show", "node", "-o", name],
                                 capture_output=True, text=True, check=True).stdout
            return next(f.split("=", 1)[1] for f in out.split() if f.startswith("NodeAddr="))

        first = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()[0]
        addr, port = node_addr(first), 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
        rank = int(os.environ["SLURM_PROCID"])
        if rank == 0:
            server = socket.create_server((addr, port))
            server.settimeout(30)
            conn, (peer, _) = server.accept()
            got = conn.recv(100).decode()
            conn.sendall(f"hello from {os.environ['SLURMD_NODENAME']}".encode())
            print(f"rank0 got {got!r} from {peer}", flush=True)
        else:
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn = socket.create_connection((addr, port), timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            conn.sendall(f"hello from {os.environ['SLURMD_NODENAME']}".encode())
            print(f"rank1 got {conn.recv(100).decode()!r}", flush=True)
        """,
    )
    out = slurm_bed.run(
        "srun", "-N2", "-n2", JOB_LIMIT, f"--chdir={tmp_path}", sys.executable, str(task)
    )
    first, second = slurm_bed.nodes[0], slurm_bed.nodes[1]
    assert f"rank0 got 'hello from {second}' from {slurm_bed.addrs[second]}" in out, out
    assert f"rank1 got 'hello from {first}'" in out, out


def test_scancel_signals_reach_tasks_or_batch_shell(slurm_bed, tmp_path):
    events = tmp_path / "events"
    task = _write(
        tmp_path / "task.py",
        f"""
        import os, signal, time

        rank = os.environ["SLURM_PROCID"]

        def note(line):
            with open({str(events)!r}, "a") as f:
                f.write(line + "\\n")

        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, lambda s, _: note(f"task{{rank}} {{signal.Signals(s).name}}"))
        note(f"task{{rank}} ready")
        time.sleep(90)
        """,
    )
    script = _write(
        tmp_path / "job.sh",
        f"""
        #!/bin/bash
        trap 'echo "batch SIGUSR1" >> {events}' USR1
        trap 'echo "batch SIGUSR2" >> {events}' USR2
        srun {sys.executable} {task} &
        # wait returns early (status > 128) whenever a trapped signal arrives.
        while ! wait; do :; done
        """,
    )
    job = slurm_bed.sbatch(
        "-N2", "--ntasks-per-node=1", JOB_LIMIT, f"--output={tmp_path}/job.out",
        f"--chdir={tmp_path}", str(script),
    )  # fmt: skip
    try:
        _wait_lines(events, {"task0 ready": 1, "task1 ready": 1})
        # --batch: the batch shell only.
        slurm_bed.run("scancel", "--batch", "--signal=USR2", str(job))
        _wait_lines(events, {"batch SIGUSR2": 1})
        # Plain: every task of every step, not the batch shell.
        slurm_bed.run("scancel", "--signal=USR1", str(job))
        _wait_lines(events, {"task0 SIGUSR1": 1, "task1 SIGUSR1": 1})
        # --full: the batch shell and the tasks.
        slurm_bed.run("scancel", "--full", "--signal=USR2", str(job))
        lines = _wait_lines(events, {"batch SIGUSR2": 2, "task0 SIGUSR2": 1, "task1 SIGUSR2": 1})
        # Signals sent later have arrived, so those not seen were not delivered.
        assert "batch SIGUSR1" not in lines, lines
    finally:
        slurm_bed.run("scancel", str(job), check=False)
    slurm_bed.wait_state(job, {"CANCELLED"}, timeout=30)


def test_job_that_requeues_itself_comes_back_with_restart_count(slurm_bed, tmp_path):
    runs = tmp_path / "runs"
    script = _write(
        tmp_path / "job.sh",
        f"""
        #!/bin/bash
        echo "run ${{SLURM_RESTART_COUNT:-0}} $SLURM_JOB_ID" >> {runs}
        if [[ -z ${{SLURM_RESTART_COUNT:-}} ]]; then
            scontrol requeue "$SLURM_JOB_ID"
            sleep 60
        fi
        """,
    )
    job = slurm_bed.sbatch(
        "-N1", "--requeue", "--open-mode=append", JOB_LIMIT,
        f"--output={tmp_path}/job.out", f"--chdir={tmp_path}", str(script),
    )  # fmt: skip
    try:
        _wait_lines(runs, {f"run 0 {job}": 1})
        deadline = time.monotonic() + 30
        while True:  # through COMPLETING back to PENDING, now with one restart
            info = slurm_bed.job(job)
            if info["JobState"] == "PENDING" and info["Restarts"] == "1":
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        # A requeued job waits out cred_expire (20 s on the bed, 120 s by default) before it may
        # start again; a test need not.
        assert info["Reason"] == "BeginTime", info
        slurm_bed.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        info = slurm_bed.wait_state(job, {"COMPLETED", "FAILED"}, timeout=30)
    finally:
        slurm_bed.run("scancel", str(job), check=False)
    assert info["JobState"] == "COMPLETED", info
    assert runs.read_text().splitlines() == [f"run 0 {job}", f"run 1 {job}"]

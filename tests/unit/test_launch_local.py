"""die_with_agent: a rank started by the elastic agent does not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline.launch.local import AGENT_PID_ENV, run_local

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

_RANK = "from pipeline.launch.local import die_with_agent; die_with_agent(); print('alive')"


def _run_rank(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", AGENT_PID_ENV)}
    return subprocess.run(
        [sys.executable, "-c", _RANK], env={**base, **env}, capture_output=True, text=True
    )


def test_rank_whose_agent_already_died_kills_itself():
    # The named agent is not this process's parent: it died while the rank was importing.
    other = subprocess.Popen([sys.executable, "-c", "pass"])
    other.wait()
    done = _run_rank(TORCHELASTIC_RUN_ID="r", **{AGENT_PID_ENV: str(other.pid)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "alive" not in done.stdout


@pytest.mark.parametrize("agent", ["parent", "unnamed"])
def test_rank_with_a_live_agent_runs_on(agent):
    named = {AGENT_PID_ENV: str(os.getpid())} if agent == "parent" else {}
    done = _run_rank(TORCHELASTIC_RUN_ID="r", **named)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alive"


def test_outside_the_agent_nothing_happens():
    # A SLURM task or a plain process: even a wrong agent PID must not kill it.
    done = _run_rank(**{AGENT_PID_ENV: "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alive"


def test_run_local_names_its_agent_for_that_launch_only(tmp_path, monkeypatch):
    # One rank that fails at once (no recipe there): afterwards this process's environment must
    # not name it as an agent, or the ranks of a later torchrun started from here would kill
    # themselves.
    monkeypatch.delenv(AGENT_PID_ENV, raising=False)
    assert run_local(tmp_path / "missing.yaml", 1) != 0
    assert AGENT_PID_ENV not in os.environ

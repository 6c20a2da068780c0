"""The `slurm_bed` fixture: a real two-node SLURM cluster on this machine (slurm/testbed.sh).

The bed is brought up once per session and taken down at the end only if this session started it
(a bed a developer left up stays up). Where it cannot come up (not root, no apt to install SLURM, no
network namespaces) the tests that use it are skipped with the reason; with CI=true they fail
instead, so CI really exercises the bed. Nothing here knows about the pipeline: it only gives the
tests the bed's facts and a few helpers to submit and watch jobs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTBED = REPO / "slurm" / "testbed.sh"
STATE_DIR = Path(os.environ.get("PTB_STATE_DIR", "/var/lib/pipeline-testbed"))
NODES = 2
UP_TIMEOUT_S = 900  # a fresh machine installs slurm-wlm and munge first


def pytest_configure(config: pytest.Config) -> None:
    # Harmless duplicate once pyproject.toml registers the marker too (--strict-markers is on).
    config.addinivalue_line("markers", "slurm: needs the SLURM test bed (root, Linux netns)")


@dataclass(frozen=True)
class SlurmBed:
    """What a test needs to know about the running bed."""

    nodes: tuple[str, ...]  # ("node1", "node2")
    addrs: dict[str, str]  # node name -> NodeAddr, each in its own network namespace
    netns: dict[str, str]  # node name -> netns name (`ip netns`)
    partition: str
    conf: Path
    started_here: bool
    env: dict[str, str] = field(repr=False)

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """Run a SLURM client command against the bed and return its stdout."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc.stdout

    def sbatch(self, *args: str) -> int:
        """Submit without waiting; returns the job id."""
        return int(self.run("sbatch", "--parsable", *args).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (finished jobs stay visible for MinJobAge)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: int, states: set[str], timeout: float = 60) -> dict[str, str]:
        """Poll until the job's JobState is one of `states`."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {info}")
            time.sleep(0.2)


def _testbed(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(TESTBED), *args], capture_output=True, text=True, timeout=timeout
    )


def _cannot(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"SLURM test bed unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(f"SLURM test bed unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm_bed() -> Iterator[SlurmBed]:
    if not sys.platform.startswith("linux"):
        _cannot("needs Linux network namespaces")
    if os.geteuid() != 0:
        _cannot("needs root (network namespaces, slurmd)")

    started_here = False
    if _testbed("status", timeout=30).returncode != 0:
        up = _testbed("up", "--nodes", str(NODES), timeout=UP_TIMEOUT_S)
        if up.returncode != 0:
            _testbed("down", timeout=120)  # leave nothing half up
            tail = "\n".join((up.stdout + up.stderr).strip().splitlines()[-25:])
            _cannot(f"`slurm/testbed.sh up --nodes {NODES}` exited {up.returncode}:\n{tail}")
        started_here = True

    listing = _testbed("nodes", timeout=30)
    rows = [line.split() for line in listing.stdout.splitlines() if line.strip()]
    if listing.returncode != 0 or len(rows) < NODES:
        _cannot(f"bed reports {len(rows)} node(s), need {NODES}: {listing.stderr.strip()}")

    # Variables of an enclosing allocation (pytest run inside a SLURM job) would send our
    # sbatch/srun there: drop them all and point the clients at the bed's configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["SLURM_CONF"] = str(STATE_DIR / "slurm.conf")
    bed = SlurmBed(
        nodes=tuple(r[0] for r in rows),
        addrs={r[0]: r[1] for r in rows},
        netns={r[0]: r[2] for r in rows},
        partition="debug",
        conf=STATE_DIR / "slurm.conf",
        started_here=started_here,
        env=env,
    )
    try:
        yield bed
    finally:
        if started_here:
            down = _testbed("down", timeout=120)
            if down.returncode != 0:
                print(f"slurm/testbed.sh down failed:\n{down.stderr}", file=sys.stderr)

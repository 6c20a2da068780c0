"""Local mode: N processes of `python -m pipeline.stages` on this machine.

torch's elastic agent (what `torchrun` runs) starts the ranks with RANK/LOCAL_RANK/WORLD_SIZE/
MASTER_* set, watches them, and stops the others when one fails. On Ctrl-C the terminal sends
SIGINT to every rank; each saves at the next step boundary and exits with `REQUEUE_EXIT_CODE`,
which we report as a clean stop, not as a failure.

The agent starts each rank in a session of its own, so when the agent itself is killed (kill -9,
the OOM killer) nothing stops the ranks: they would train on as orphans and write checkpoints
beside the job that replaces them. `die_with_agent`, called first thing in every rank, asks the
kernel to SIGKILL the rank when its agent goes, as a crash of the whole node would. A rank
spends seconds importing before it gets there, so the launcher names its own PID in
`AGENT_PID_ENV`: a rank whose agent died meanwhile (its parent is no longer that PID) kills itself.

Not here: recipe validation, the run directory and its lock (`tools/launch.py` does them
first, and holds `RUN_DIR/launch.lock` around `run_local` for the run's duration).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import uuid
from pathlib import Path

from pipeline.train.distributed import free_port
from pipeline.train.preemption import REQUEUE_EXIT_CODE

log = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
AGENT_PID_ENV = "PIPELINE_AGENT_PID"  # set by run_local, whose process is the ranks' agent


def die_with_agent() -> None:
    """In a rank started by torch's elastic agent (ours or `torchrun`, on Linux): be SIGKILLed
    when the agent dies. Elsewhere (SLURM tasks, single processes) it does nothing.

    The agent is the PID in `AGENT_PID_ENV` (run_local) or, under a plain `torchrun`, the parent
    at this call; if the parent is not the agent, the agent has already died and the rank kills
    itself."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    agent = int(os.environ.get(AGENT_PID_ENV) or os.getppid())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank may outlive its agent",
                    ctypes.get_errno())  # fmt: skip
    elif os.getppid() != agent:  # the agent died before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def stage_args(config: Path, stages: list[str] | None = None) -> list[str]:
    """The arguments of `python -m pipeline.stages` for a resolved recipe."""
    args = ["-m", "pipeline.stages", str(config)]
    for stage in stages or []:
        args += ["--stage", stage]
    return args


def run_local(config: Path, nproc: int, stages: list[str] | None = None) -> int:
    """Run the recipe at `config` on `nproc` local ranks; returns an exit status.

    0: the stages finished; `REQUEUE_EXIT_CODE`: stopped on request after a checkpoint (run it
    again to resume); anything else: a rank failed (its error is in the log above).
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        logs_specs=DefaultLogsSpecs(),
    )
    # The agent runs in this process and the ranks inherit its environment. The name holds for
    # this launch only: a torchrun started later from this process must not inherit a stale PID.
    previous = os.environ.get(AGENT_PID_ENV)
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    try:
        elastic_launch(cfg, sys.executable)(*stage_args(config, stages))
    except ChildFailedError as err:
        codes = {f.exitcode for f in err.failures.values()}
        if codes == {REQUEUE_EXIT_CODE}:
            return REQUEUE_EXIT_CODE
        log.error("a rank failed: %s", err.format_msg())
        return max((c for c in codes if c > 0), default=1)
    except SignalException as err:
        log.warning("stopped by %s", err.sigval.name)
        return REQUEUE_EXIT_CODE
    finally:
        if previous is None:
            del os.environ[AGENT_PID_ENV]
        else:
            os.environ[AGENT_PID_ENV] = previous
    return 0

"""SLURM through submitit: the allocation from `recipe.launch`, and the callable every task runs.

`slurm_parameters` maps the recipe's `launch` section onto submitit's executor parameters (one
task per GPU, or one per node on CPU nodes). `StageTask` is the submitted callable: each task
reads its rank from submitit's JobEnvironment, finds the master's address and a port derived
from the job id, joins the process group and runs the recipe's stages.

Time limits, preemption and cancels (`pipeline.train.preemption`): the job asks SLURM for
`TIME_LIMIT_SIGNAL` (SIGUSR1) `SIGNAL_DELAY_S` before its time limit, explicitly, not through
submitit's default (SIGUSR2). SLURM sends it to every task; every rank notes it, the ranks agree at
the next step boundary, save together, and rank 0 requeues the job (`scontrol requeue`), which
resumes from the run directory's last committed checkpoint. SIGTERM (`scancel`, preemption,
`scontrol requeue`) also stops with a save, but rank 0 never requeues after it: SLURM requeues a
preempted job itself, and a cancelled one must stay cancelled. submitit's own handlers (rank 0
only, inside the signal handler, no collective save possible) are replaced for the whole task.

Failures: `srun --kill-on-bad-exit=1` ends every task of the job when one exits non-zero, and a
rank that raises exits at once (`pipeline.stages.run_task`), so the others never wait in a
collective for the process-group timeout.

Not here: recipe validation and the run directory checks (`tools/launch.py`), the stages.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Recipe
from pipeline.fileio import write_atomic
from pipeline.train.preemption import TIME_LIMIT, TIME_LIMIT_SIGNAL, requeue_wanted

log = logging.getLogger(__name__)

# Seconds between the time-limit warning and the limit: room for one checkpoint save (SLURM may
# send it up to a minute early). `launch.sbatch_args: ["--signal=USR1@S"]` changes it.
SIGNAL_DELAY_S = 120
# One rank exiting non-zero (an exception, the OOM killer) ends every task of the step.
SRUN_ARGS = ["--kill-on-bad-exit=1"]


def tasks_per_node(recipe: Recipe) -> int:
    """One task per GPU; one per node on CPU-only nodes."""
    return max(recipe.launch.gpus_per_node, 1)


def slurm_parameters(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """submitit `update_parameters` keywords (the `slurm_` prefixed AutoExecutor names)."""
    la = recipe.launch
    params: dict[str, Any] = {
        "nodes": la.nodes,
        "tasks_per_node": tasks_per_node(recipe),
        "cpus_per_task": la.cpus_per_task,
        "timeout_min": la.time_min,
        "name": la.job_name or recipe.run.name,
        "slurm_srun_args": list(SRUN_ARGS),
        # The signal the trainer handles, named here: submitit's own default is its USR_SIG.
        # A requeued job keeps its id, so its log files: append instead of truncating them.
        "slurm_additional_parameters": {
            "signal": f"{TIME_LIMIT_SIGNAL.name[3:]}@{SIGNAL_DELAY_S}",
            "requeue": True,
            "open_mode": "append",
        },
    }
    if la.gpus_per_node:
        params["gpus_per_node"] = la.gpus_per_node
    if la.mem_gb:
        params["mem_gb"] = la.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(la, key):
            params[f"slurm_{key}"] = getattr(la, key)
    if la.exclusive:
        params["slurm_exclusive"] = True
    extra = params["slurm_additional_parameters"]
    for arg in la.sbatch_args:
        key, _, value = arg.lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value if value else True
    check_signal(str(extra["signal"]))
    return params


def check_signal(spec: str) -> None:
    """Refuse a `--signal` the trainer would not handle, or one sent to the batch shell only."""
    name, _, delay = spec.partition("@")
    if name.startswith(("B:", "R:")) or f"SIG{name.upper()}" not in TIME_LIMIT or not delay:
        raise ValueError(
            f"--signal={spec}: the trainer stops at {TIME_LIMIT_SIGNAL.name[3:]}@<seconds> "
            "(sent to every task); give that form in launch.sbatch_args"
        )


def slurm_job_id() -> str | None:
    """The job id when this process is a task of a SLURM job step (ours or the template's);
    None elsewhere, also for local ranks started by torch's elastic agent inside an allocation."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    return os.environ.get("SLURM_JOB_ID") or None


def adopt_srun_task() -> None:
    """In a task that `srun` started directly (slurm/sbatch_template.sh), take the rank facts from
    SLURM's variables and name the interface towards the master, as `StageTask` does for submitit
    tasks. Variables already set win."""
    facts = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_NTASKS"}
    for ours, theirs in facts.items():
        if theirs in os.environ:
            os.environ.setdefault(ours, os.environ[theirs])
    master = os.environ.get("MASTER_ADDR")
    iface = interface_towards(master) if master else None
    if iface and iface != "lo":  # gloo/NCCL would otherwise advertise the hostname's address
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


def requeue_if_timed_out(code: int, rank: int) -> bool:
    """On rank 0 of a SLURM job that stopped at its time-limit warning: requeue it (the run
    resumes from its committed checkpoint). Never after a SIGTERM: `scancel` means stop for good,
    and SLURM requeues a preempted job itself. Returns whether it requeued."""
    from pipeline.train.preemption import REQUEUE_EXIT_CODE, signals_received

    job_id = slurm_job_id()
    if rank != 0 or code != REQUEUE_EXIT_CODE or not job_id:
        return False
    if not requeue_wanted():
        log.warning("stopped on %s: not requeueing job %s", signals_received(), job_id)
        return False
    # A cancel marks the job before its SIGTERM reaches us, and `scontrol requeue` would bring a
    # cancelled job back: requeue only a job SLURM still lists as running.
    state = _job_state(job_id)
    if state != "RUNNING":
        log.warning("time limit, but job %s is %s: not requeueing it", job_id, state)
        return False
    log.warning("time limit: requeueing job %s to resume from the committed checkpoint", job_id)
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, (out.stderr or out.stdout).strip())
    return out.returncode == 0


def _job_state(job_id: str) -> str | None:
    """SLURM's JobState of a job (None when it cannot be told)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def submit(recipe: Recipe, run_dir: Path, config: Path, stages: list[str] | None) -> Any:
    """Submit the job; returns submitit's Job (logs under run_dir/slurm/)."""
    import submitit

    executor = submitit.AutoExecutor(folder=run_dir / "slurm" / "%j", cluster="slurm")
    executor.update_parameters(**slurm_parameters(recipe, run_dir))
    return executor.submit(StageTask(str(config), stages))


def node_address(host: str) -> str:
    """An address for `host`: DNS/hosts if it resolves, else SLURM's NodeAddr for it."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        pass
    out = subprocess.run(
        ["scontrol", "show", "node", host], capture_output=True, text=True, check=True
    ).stdout
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    raise RuntimeError(f"cannot find an address for node {host!r} (scontrol show node: {out!r})")


def interface_towards(addr: str) -> str | None:
    """The local network interface that routes to `addr` (None when it cannot be told)."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))  # UDP connect sends nothing; it only picks the route
        except OSError:
            return None
        local = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None


def master_port(job_id: str) -> int:
    """A port every task derives alike from the job id, below the ephemeral range."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 10000


def _record_task(run_dir: Path, job: Any, master: str, iface: str | None) -> None:
    """Where this rank runs, in run_dir/slurm/tasks/rank-N.json (rewritten on a requeue)."""
    record = {
        "job_id": job.job_id,
        "rank": job.global_rank,
        "local_rank": job.local_rank,
        "node": job.node,
        "node_name": os.environ.get("SLURMD_NODENAME"),
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "netns": os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None,
        "master": master,
        "interface": iface,
        "pid": os.getpid(),
    }
    path = run_dir / "slurm" / "tasks" / f"rank-{job.global_rank:05d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record) + "\n")


@dataclass
class StageTask:
    """The callable submitit runs on every task of the job."""

    config: str
    stages: list[str] | None = None

    def __call__(self) -> None:
        import submitit

        from pipeline.config import load_recipe
        from pipeline.stages import run_dir_of, run_task
        from pipeline.train.distributed import DistEnv
        from pipeline.train.preemption import hold_stop_signals

        hold_stop_signals()  # first: submitit's handlers must never run (module docstring)

        job = submitit.JobEnvironment()
        master = node_address(job.hostnames[0])
        os.environ.update(
            MASTER_ADDR=master,
            MASTER_PORT=str(master_port(job.job_id)),
            RANK=str(job.global_rank),
            LOCAL_RANK=str(job.local_rank),
            WORLD_SIZE=str(job.num_tasks),
        )
        # gloo/NCCL otherwise advertise whatever the hostname resolves to (often 127.0.x.1).
        iface = interface_towards(master)
        if iface and iface != "lo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
        logging.basicConfig(
            level=logging.INFO if job.global_rank == 0 else logging.WARNING,
            format=f"%(asctime)s [rank {job.global_rank}] %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
            force=True,
        )
        log.info("job %s: %d tasks, master %s:%s, interface %s", job.job_id,
                 job.num_tasks, master, os.environ["MASTER_PORT"], iface)  # fmt: skip
        recipe = load_recipe(self.config)
        run_dir = run_dir_of(recipe)
        _record_task(run_dir, job, master, iface)
        env = DistEnv(job.global_rank, job.local_rank, job.num_tasks)
        run_task(recipe, env, run_dir, self.stages)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook, should its handler ever run: the same task resumes."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)

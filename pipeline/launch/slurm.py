"""SLURM through submitit: the allocation from `recipe.launch`, and the callable every task runs.

`slurm_parameters` maps the recipe's `launch` section onto submitit's executor parameters (one
task per GPU, or one per node on CPU nodes). `StageTask` is the submitted callable: each task
reads its rank from submitit's JobEnvironment, finds the master's address and a port derived
from the job id, joins the process group and runs the recipe's stages.

Preemption and time limits (PITFALLS.md): SLURM signals every task (SIGUSR1 before the time
limit through `--signal`, SIGTERM on preemption or `scontrol requeue`). submitit's own hook would
run on rank 0 only, inside the signal handler, where no collective save can run; the trainer's
`StopFlag` replaces it while training, every rank agrees at the next step boundary and saves, and
then rank 0 requeues the job itself (`scontrol requeue`). The requeued job runs the same callable,
which resumes from the run directory's last committed checkpoint.

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

log = logging.getLogger(__name__)


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
        "slurm_signal_delay_s": 120,  # SIGUSR1 two minutes before the limit: time to save
        # A requeued job keeps its id, so its log files: append instead of truncating them.
        "slurm_additional_parameters": {"requeue": True, "open_mode": "append"},
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
    return params


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
        from pipeline.stages import run_dir_of, run_stages
        from pipeline.train.distributed import DistEnv, finish_and_exit
        from pipeline.train.preemption import REQUEUE_EXIT_CODE

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
        code = run_stages(recipe, env, run_dir, self.stages)
        if code == REQUEUE_EXIT_CODE and job.global_rank == 0:
            log.warning("requeueing job %s to resume from the committed checkpoint", job.job_id)
            subprocess.run(["scontrol", "requeue", str(job.job_id)], check=False)
        # os._exit after a barrier: the interpreter's teardown can abort under ZeRO-3 (see
        # finish_and_exit), and the figures are already in the run directory.
        finish_and_exit(code)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook, should it run: the same task resumes from the run dir."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)

"""Process-group set-up and the few collectives the training loop hands to lower layers.

Rank facts come from the environment the launcher sets (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), never from the host name. The backend follows the device: NCCL on
GPUs, gloo on CPU, through DeepSpeed's own initialisation so its communication layer agrees.
"""

from __future__ import annotations

import os
import random
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, its rank on the node, the world size, its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environ() -> DistEnv:
    """The rank facts a launcher (ours, torchrun, deepspeed) put in the environment."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port for MASTER_PORT, below the kernel's ephemeral range (32768+ on Linux).

    Ports from the ephemeral range can be handed to gloo's own connections between our check and
    the master's bind, which fails the rendezvous now and then.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def rank_environ(rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> dict[str, str]:
    """The variables a process of a single-node group needs (what a launcher exports)."""
    return {
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
    }


def quiet_third_party() -> None:
    """Silence, once per process, notices nobody running the pipeline can act on: torch's
    deprecation of the collective DeepSpeed calls (printed by every rank), and DeepSpeed's note
    that it fell back to its CPU accelerator (named explicitly instead, as its docs advise)."""
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
    )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(env: DistEnv) -> None:
    """Join the process group (a no-op when already joined); single processes join one of 1."""
    quiet_third_party()  # before DeepSpeed is imported: it reads DS_ACCELERATOR then
    import deepspeed  # heavy import, only where a process group is made

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor (identity on a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def every_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when `flag` holds on every rank (a MIN all-reduce): how ranks agree to stop."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    if device is None:  # NCCL reduces CUDA tensors only
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def finish_and_exit(code: int = 0) -> None:
    """Leave a process that has finished its work: barrier, tear the group down, `os._exit`.

    Under ZeRO-3 on CPU a C++ thread is sometimes still joinable when the interpreter's static
    destructors run, which aborts the process (SIGABRT) after all work is done. Exiting without
    those destructors keeps a finished rank's status 0. Root cause not found yet.
    """
    import sys

    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    """Wait for every rank (no-op on a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

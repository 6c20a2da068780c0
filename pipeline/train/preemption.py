"""Stop requests from signals, agreed by every rank at a step boundary, and what a stop means.

The signals, and what each asks for:
- `TIME_LIMIT_SIGNAL` (SIGUSR1): the SLURM launcher and `slurm/sbatch_template.sh` ask SLURM for
  it explicitly (`--signal=USR1@S`, S seconds before the time limit; it reaches every task).
  Stop, save, and requeue the job ourselves: SLURM would let it end at the limit.
- SIGUSR2: submitit's default for the same warning (its `JobEnvironment.USR_SIG`). Treated like
  SIGUSR1, so that submitit's own handler (which requeues and exits rank 0 mid-step, with no
  save) never runs, whatever signal a job was submitted with.
- SIGTERM: `scancel`, or preemption / `scontrol requeue`, which requeue the job themselves. Stop
  and save if there is time (SLURM sends SIGKILL `KillWait` seconds later); never requeue
  ourselves: a cancelled job must stay cancelled.
- SIGINT: Ctrl-C on local processes; stop and save. A second one stops at once.

A signal handler must not run a collective ZeRO save, so the handler only sets a flag; the
training loop asks `StopFlag.agreed()` once per step (one tiny all-reduce of the strongest
reason), and when any rank has a reason, every rank saves the same step together and returns.
The exit status `REQUEUE_EXIT_CODE` then says "stopped on request with a committed checkpoint";
`requeue_wanted()` says whether this process should requeue the job (time limit only).

`hold_stop_signals()` notes these signals for the life of a task, outside training too: a
warning that comes while DeepSpeed initialises stops training at its first step, and submitit's
handlers are never left in place.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
REQUEUE_EXIT_CODE = 75
TIME_LIMIT_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# Stop reasons by strength: when ranks got different signals, they all stop for the strongest
# one, so a cancel seen by any rank wins over a time-limit warning (no requeue).
_STRENGTH = {"SIGUSR2": 1, "SIGUSR1": 2, "SIGINT": 3, "SIGTERM": 4}
_NAME = {v: k for k, v in _STRENGTH.items()}
TIME_LIMIT = frozenset({"SIGUSR1", "SIGUSR2"})
TERMINATE = frozenset({"SIGTERM", "SIGINT"})


class _Record:
    """What this process has been asked, shared by every handler (signals are per process)."""

    def __init__(self) -> None:
        self.received: list[str] = []  # every stop signal, in order of arrival
        self.pending: list[str] = []  # noted while no StopFlag was listening
        self.stop: str | None = None  # the reason the ranks agreed to stop for

    def strongest(self, names: Sequence[str]) -> str | None:
        return max(names, key=_STRENGTH.__getitem__, default=None)


_record = _Record()


def wants_requeue(stop: str | None, received: Sequence[str]) -> bool:
    """Requeue ourselves only after a stop at the time-limit warning, and never once a SIGTERM or
    SIGINT came (a cancel; on preemption SLURM requeues the job itself)."""
    return stop in TIME_LIMIT and not TERMINATE.intersection(received)


def requeue_wanted() -> bool:
    """`wants_requeue` for this process: its agreed stop and every signal it got."""
    return wants_requeue(_record.stop, _record.received)


def signals_received() -> list[str]:
    """The stop signals this process got so far, in order."""
    return list(_record.received)


def _note(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    _record.received.append(name)
    _record.pending.append(name)
    log.warning("%s received outside training: noted", name)


def hold_stop_signals(signals: Sequence[signal.Signals] = STOP_SIGNALS[:3]) -> None:
    """Note `signals` for the life of the process instead of their default action (death) or
    submitit's handlers; the next `StopFlag` starts out set by them. SIGINT is left alone by
    default, so Ctrl-C still interrupts work outside the training loops."""
    for s in signals:
        signal.signal(s, _note)


class StopFlag:
    """Sets itself on the stop signals; restores the previous handlers on `close`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        # A signal noted by `hold_stop_signals` before training started counts as a request.
        self.requested: str | None = _record.strongest(_record.pending)
        _record.pending.clear()
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        _record.received.append(name)
        if self.requested is None:
            self.requested = name
            log.warning("%s received: saving at the next step boundary", name)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        elif _STRENGTH[name] > _STRENGTH[self.requested]:
            self.requested = name  # e.g. scancel after the time-limit warning: no requeue

    def agreed(self, world_size: int) -> bool:
        """True on every rank when any rank got a stop signal (a collective when world > 1).

        Every rank then holds the same `requested`: the strongest reason any rank had.
        """
        mine = _STRENGTH[self.requested] if self.requested else 0
        strongest = mine if world_size == 1 else _max_over_ranks(mine)
        if strongest == 0:
            return False
        self.requested = _NAME[strongest]
        _record.stop = self.requested
        return True

    def close(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def _max_over_ranks(value: int) -> int:
    """The largest `value` over all ranks (one all-reduce; identity on a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())

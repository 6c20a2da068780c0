"""Stop requests from signals, agreed by every rank at a step boundary.

SLURM sends SIGUSR1 (`--signal=USR1@S`, before the time limit) or SIGTERM (preemption,
`scancel`) to every task; Ctrl-C sends SIGINT to every local process. A signal handler must not
run a collective ZeRO save, so the handler only sets a flag; the training loop asks
`StopFlag.agreed()` once per step (one tiny all-reduce), and when any rank has the flag, every rank
saves the same step together and returns. The exit status `REQUEUE_EXIT_CODE` then tells the
launcher "stopped on request with a committed checkpoint: requeue me".
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from pipeline.train.distributed import every_rank

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Sets itself on SIGUSR1/SIGTERM/SIGINT; restores the previous handlers on `close`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.requested: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            log.warning("%s received: saving at the next step boundary", self.requested)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint

    def agreed(self, world_size: int) -> bool:
        """True on every rank when any rank got a stop signal (a collective when world > 1)."""
        if world_size == 1:
            return self.requested is not None
        return not every_rank(self.requested is None)

    def close(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

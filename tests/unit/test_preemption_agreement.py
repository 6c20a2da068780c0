"""Two ranks (real processes, gloo) that got different stop signals agree on one stop reason.

The requeue decision rests on it: the time-limit warning seen by one rank makes every rank stop
for it, and a SIGTERM (scancel) seen by any rank wins over the warning everywhere.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

from pipeline.train.distributed import free_port

# (signal sent to rank 0, to rank 1) -> the reason both stop for, and whether to requeue.
CASES = [
    ((None, "SIGUSR1"), "SIGUSR1", True),  # the warning reached rank 1 only (so far)
    (("SIGUSR1", "SIGTERM"), "SIGTERM", False),  # a cancel on any rank wins
    (("SIGUSR2", "SIGUSR1"), "SIGUSR1", True),  # submitit's default and ours: a time limit
]


def _rank(rank: int, port: int, out: mp.Queue) -> None:
    """One rank: every case in turn, with a fresh per-process signal record each time."""
    import torch.distributed as dist

    from pipeline.train import preemption

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for case, (sent, _, _) in enumerate(CASES):
        preemption._record = preemption._Record()
        flag = preemption.StopFlag()
        first = flag.agreed(2)  # nobody has a reason yet
        if sent[rank]:
            os.kill(os.getpid(), getattr(signal, sent[rank]))
        second = flag.agreed(2)
        flag.close()
        out.put((rank, case, first, second, flag.requested, preemption.requeue_wanted()))
    dist.destroy_process_group()


def test_ranks_agree_on_the_strongest_stop_reason():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in range(2 * len(CASES)))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    want = sorted((r, case, False, True, reason, requeue)
                  for r in range(2) for case, (_, reason, requeue) in enumerate(CASES))  # fmt: skip
    assert results == want

"""The DINO centre across 2 gloo processes whose batches differ in size (bucketed batches)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.methods.dino import DINOLoss
from pipeline.train.distributed import all_reduce_sum, free_port, rank_environ

OUT_DIM = 16
BATCH = {0: 3, 1: 5}  # global crops per rank this step: unequal on purpose


def _outputs(rank: int) -> list[torch.Tensor]:
    """Rank `rank`'s teacher outputs: two global crops of BATCH[rank] images each."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(BATCH[rank], OUT_DIM, generator=g) for _ in range(2)]


def _rank_main(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(rank_environ(rank, world_size, port))
    dist.init_process_group("gloo")
    loss = DINOLoss(OUT_DIM, center_momentum=0.5)
    for _ in range(3):  # a few steps, so an error would compound
        loss.update_center(_outputs(rank), all_reduce_sum, world_size)
    torch.save(loss.center, Path(out) / f"center-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_center_is_the_global_mean_on_every_rank_with_unequal_batches(tmp_path):
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    centers = [torch.load(tmp_path / f"center-{r}.pt") for r in range(2)]
    assert torch.equal(centers[0], centers[1])

    # Reference: one process holding all 16 crops; the centre after 3 equal updates.
    mean = torch.cat([t for r in range(2) for t in _outputs(r)]).mean(0, keepdim=True)
    want = torch.zeros(1, OUT_DIM)
    for _ in range(3):
        want = 0.5 * want + 0.5 * mean
    torch.testing.assert_close(centers[0], want)

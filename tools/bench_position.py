"""The data position at web scale, simulated: layout, save and resume of a 2-billion-sample epoch.

    python tools/bench_position.py [--samples 2e9] [--shard-samples 10000] [--world 1024]
        [--workers 8] [--batch 256] [--buffer 2000] [--new-world 768] [--json FILE]

No images: the shards are a simulated manifest (`ShardRef`s only). Every rank of a run of
`--world` ranks is stopped half-way through the epoch; each worker's shuffle buffer holds what
webdataset's shuffle really leaves in it (one worker's stream is replayed through the same
shuffle with positions instead of samples, and that pattern is used for every worker). The
per-rank states are written as the trainer writes them (`rank-NNNNN.pt`) and read back through
the checkpoint code, then:

- a resume at the same layout: one rank's load (how many rank files it reads, how long);
- a resume on `--new-world` ranks: a few ranks' loads and layouts, and a check that the samples
  shared out are exactly those not consumed.

Prints, and writes to `--json` (default bench_position.json): layout time per rank, bytes per
rank state (and what a bitmap of the data set would take), load times, rank files read.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import layout
from pipeline.data.layout import ShardRef, epoch_pieces, plan_epoch
from pipeline.data.stream import STATE_VERSION, ShardLoader
from pipeline.train.checkpoint import RankStates

SEED, EPOCH = 0, 3


class Counted:
    """A sequence that counts which items were read."""

    def __init__(self, items) -> None:
        self.items, self.read = items, set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        self.read.add(i % len(self))
        return self.items[i]


def buffer_pattern(length: int, emitted: int, buffer: int) -> tuple[int, np.ndarray]:
    """(samples read, positions still in the buffer) after `emitted` samples of a stream of
    `length` went through webdataset's shuffle (as the loader calls it)."""
    from webdataset.filters import _shuffle

    read = [0]

    def positions():
        for p in range(length):
            read[0] += 1
            yield p

    out = set()
    stream = _shuffle(positions(), buffer, buffer, rng=random.Random(1))
    for _ in range(emitted):
        out.add(next(stream))
    return read[0], np.array(sorted(set(range(read[0])) - out), dtype=np.int64)


def state_of(rank: int, args, shards, pieces, read_frac: float, held: np.ndarray) -> dict:
    """A rank's position half-way through the epoch, in the loader's saved format."""
    plan = plan_epoch(shards, seed=SEED, epoch=EPOCH, rank=rank, world_size=args.world,
                      workers=args.workers, batch_size=args.batch, pieces=pieces)  # fmt: skip
    runs = [layout.runs_of(shards, w.segments) for w in plan.workers]
    lengths = [int(r[:, 1].sum()) for r in runs]
    read = [min(int(n * read_frac) + len(held), n) for n in lengths]
    pending = [np.clip(r - 1 - held, 0, None) for r in read]
    pending = [np.unique(p) for p in pending]
    return {
        "version": STATE_VERSION,
        "mode": "exact",
        "epoch": EPOCH,
        "rank": rank,
        "world_size": args.world,
        "workers": args.workers,
        "batch_size": args.batch,
        "seed": SEED,
        "total": pieces.total,
        "batches": plan.batches // 2,
        "remaining": pieces.total,
        "split": [rank, args.world],
        "runs": [torch.from_numpy(r) for r in runs],
        "read": read,
        "pending": [torch.from_numpy(p.astype(np.int32)) for p in pending],
        "left": [n - r + len(p) for n, r, p in zip(lengths, read, pending, strict=True)],
        "bad": {},
    }


def loader(shards, rank: int, world: int, args) -> ShardLoader:
    return ShardLoader(shards, transform=None, collate=None, batch_size=args.batch, rank=rank,
                       world_size=world, seed=SEED, workers=args.workers,
                       shuffle_buffer=args.buffer)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_position.py", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=float, default=2e9)
    p.add_argument("--shard-samples", type=int, default=10_000)
    p.add_argument("--world", type=int, default=1024)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--buffer", type=int, default=2000)
    p.add_argument("--new-world", type=int, default=768)
    p.add_argument("--json", type=Path, default=Path("bench_position.json"))
    args = p.parse_args(argv)

    n_shards = int(args.samples) // args.shard_samples
    shards = tuple(
        ShardRef(f"sim/shard-{i:06d}.tar", args.shard_samples, i * args.shard_samples)
        for i in range(n_shards)
    )
    total = n_shards * args.shard_samples
    fig: dict = {"samples": total, "shards": n_shards, "world": args.world,
                 "workers": args.workers, "batch": args.batch, "buffer": args.buffer}  # fmt: skip

    t = time.perf_counter()
    pieces = epoch_pieces(shards, seed=SEED, epoch=EPOCH)
    fig["epoch_order_s"] = time.perf_counter() - t
    t = time.perf_counter()
    plan_epoch(shards, seed=SEED, epoch=EPOCH, rank=args.world // 2, world_size=args.world,
               workers=args.workers, batch_size=args.batch)  # fmt: skip
    fig["plan_one_rank_s"] = time.perf_counter() - t

    per_worker = total // (args.world * args.workers)
    t = time.perf_counter()
    read, held = buffer_pattern(per_worker, per_worker // 2, args.buffer)
    fig["shuffle_replay_one_worker_s"] = time.perf_counter() - t
    held = read - 1 - held  # distances below the read count
    fig["pending_per_worker"] = len(held)

    with tempfile.TemporaryDirectory() as tmp:
        tag = Path(tmp)
        sizes, consumed = [], 0
        t = time.perf_counter()
        for r in range(args.world):
            st = state_of(r, args, shards, pieces, 0.5, held)
            consumed += sum(n - len(q)
                            for n, q in zip(st["read"], st["pending"], strict=True))  # fmt: skip
            buf = io.BytesIO()
            torch.save({"data": st, "rng": {}}, buf)
            sizes.append(buf.tell())
            (tag / f"rank-{r:05d}.pt").write_bytes(buf.getvalue())
        fig["write_states_s"] = time.perf_counter() - t
        fig["state_bytes_per_rank_mean"] = statistics.mean(sizes)
        fig["state_bytes_per_rank_max"] = max(sizes)
        fig["bitmap_bytes_per_rank"] = -(-total // 8)  # the format before: one bit per sample

        states = Counted(RankStates(tag, args.world).field("data"))
        t = time.perf_counter()
        loader(shards, 5, args.world, args).load_state_dict(states)
        fig["same_layout_load_s"] = time.perf_counter() - t
        fig["same_layout_files_read"] = len(states.read)

        loads = []
        shared = None
        for r in sorted({0, args.new_world // 2, args.new_world - 1}):
            states = Counted(RankStates(tag, args.world).field("data"))
            ld = loader(shards, r, args.new_world, args)
            t = time.perf_counter()
            ld.load_state_dict(states)
            plan = ld.plan()
            loads.append(time.perf_counter() - t)
            state = ld.state_dict()
            shared = state["remaining"]
            assert sum(int(x[:, 1].sum()) for x in state["runs"]) == plan.real
        fig["new_layout_load_s"] = loads
        fig["new_layout_files_read"] = len(states.read)
        fig["consumed"] = consumed
        fig["shared_out_after_change"] = shared
        if shared != total - consumed:
            raise SystemExit(f"the new layout shares {shared} samples, expected {total - consumed}")
    print(json.dumps(fig, indent=1))
    args.json.write_text(json.dumps(fig, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

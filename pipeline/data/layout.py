"""The epoch layout: which samples each rank and loader worker reads, in which order.

A layout is a pure function of (seed, epoch, world size, workers, batch size) and of the samples
already done this epoch, so a position needs only a few numbers per worker to be recomputed. Its
cost grows with the number of shards, never with the number of samples: sets of samples are kept
as sorted, disjoint `[start, end)` ranges of global ids ("intervals", an (n, 2) int64 array), and
an epoch's order as pieces (shard, first, end) of contiguous samples.

- `epoch_pieces`: the shards in their seeded permuted order, minus the done samples;
- `plan_epoch`: one rank's share of those pieces, cut into blocks for its loader workers;
- `RawIndex`: where a sample sits in one worker's reading order, and back (what a position is
  measured in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMPTY = np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class ShardRef:
    """One shard: where it is, how many samples it holds, the global id of its first sample."""

    url: str
    samples: int
    offset: int

    @property
    def name(self) -> str:
        return Path(self.url).name


def seed_of(*parts: int) -> int:
    """One 63-bit seed from several integers (stable across processes and Python versions)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------
# Intervals


def merge(intervals: np.ndarray) -> np.ndarray:
    """Sorted, disjoint intervals covering the same ids (overlapping or touching ones joined)."""
    iv = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    iv = iv[iv[:, 1] > iv[:, 0]]
    if len(iv) < 2:
        return iv.copy()
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    reach = np.maximum.accumulate(iv[:, 1])
    # A new run starts where an interval begins past everything before it.
    starts = np.concatenate([[True], iv[1:, 0] > reach[:-1]])
    first = np.flatnonzero(starts)
    last = np.concatenate([first[1:], [len(iv)]]) - 1
    return np.stack([iv[first, 0], reach[last]], axis=1)


def union(*sets: np.ndarray | None) -> np.ndarray:
    """The ids in any of `sets` (None entries skipped)."""
    parts = [s for s in sets if s is not None and len(s)]
    return merge(np.concatenate(parts)) if parts else EMPTY.copy()


def complement(intervals: np.ndarray, total: int) -> np.ndarray:
    """The ids of [0, total) not in `intervals` (sorted, disjoint)."""
    iv = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    edges = np.concatenate([[0], iv.ravel(), [total]]).reshape(-1, 2)
    return edges[edges[:, 1] > edges[:, 0]]


def count(intervals: np.ndarray | None) -> int:
    """How many ids the intervals hold."""
    if intervals is None or not len(intervals):
        return 0
    return int((intervals[:, 1] - intervals[:, 0]).sum())


def from_bitmap(mask: np.ndarray) -> np.ndarray:
    """Intervals of the set entries of a boolean array (the position format before intervals)."""
    padded = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return change.reshape(-1, 2).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Pieces: an epoch's reading order


@dataclass(frozen=True)
class Pieces:
    """Contiguous runs of samples in reading order: shard index, local first and end, and the
    cumulative count before each piece (`cum`, one longer than the pieces)."""

    shard: np.ndarray
    first: np.ndarray
    end: np.ndarray
    cum: np.ndarray

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def slice(self, lo: int, hi: int) -> tuple[tuple[int, int, int], ...]:
        """Positions [lo, hi) of the order, as (shard, first, end) pieces."""
        if hi <= lo:
            return ()
        k0 = int(np.searchsorted(self.cum, lo, side="right")) - 1
        k1 = int(np.searchsorted(self.cum, hi, side="left"))
        out = []
        for k in range(k0, k1):
            a = max(lo, int(self.cum[k])) - int(self.cum[k])
            b = min(hi, int(self.cum[k + 1])) - int(self.cum[k])
            if a < b:
                first = int(self.first[k])
                out.append((int(self.shard[k]), first + a, first + b))
        return tuple(out)


def epoch_pieces(
    shards: Sequence[ShardRef], *, seed: int, epoch: int, done: np.ndarray | None = None
) -> Pieces:
    """The epoch's samples not in `done` (intervals), shards in their seeded order, each shard's
    samples in file order. Vectorised: O(shards + intervals), whatever the sample count."""
    samples = np.array([s.samples for s in shards], dtype=np.int64)
    offsets = np.array([s.offset for s in shards], dtype=np.int64)
    order = np.random.default_rng(seed_of(seed, epoch, 1)).permutation(len(shards))
    if done is None or not len(done):
        shard, first, end = order, np.zeros(len(order), dtype=np.int64), samples[order]
    else:
        left = complement(done, int(samples.sum()))
        a, b = left[:, 0], left[:, 1]
        # Each remaining interval is cut at the shard boundaries it crosses.
        lo = np.searchsorted(offsets, a, side="right") - 1
        hi = np.searchsorted(offsets, b - 1, side="right") - 1
        n = hi - lo + 1
        which = np.repeat(np.arange(len(left)), n)
        step = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        idx = lo[which] + step
        start = np.maximum(a[which], offsets[idx])
        stop = np.minimum(b[which], offsets[idx] + samples[idx])
        keep = stop > start  # empty shards inside a crossing
        idx, start, stop = idx[keep], start[keep], stop[keep]
        rank_of = np.empty(len(shards), dtype=np.int64)
        rank_of[order] = np.arange(len(shards))
        sort = np.lexsort((start, rank_of[idx]))
        shard = idx[sort]
        first, end = start[sort] - offsets[shard], stop[sort] - offsets[shard]
    keep = end > first
    shard, first, end = shard[keep], first[keep], end[keep]
    cum = np.concatenate([[0], np.cumsum(end - first)]).astype(np.int64)
    return Pieces(shard.astype(np.int64), first.astype(np.int64), end.astype(np.int64), cum)


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class WorkerPlan:
    """What one loader worker of one rank produces in one epoch.

    segments: (shard index, first, end) local sample ranges, in reading order.
    sizes: the size of each of its batches, in order.
    slots: each batch's position in the rank's output order.
    """

    segments: tuple[tuple[int, int, int], ...]
    sizes: tuple[int, ...]
    slots: tuple[int, ...]


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: `batches` batches holding `real` samples and `padding` repeats."""

    batches: int
    real: int
    padding: int
    workers: tuple[WorkerPlan, ...]


@dataclass(frozen=True)
class Split:
    """How `remaining` samples are shared: this rank's batches and its workers' stretches."""

    batches: int
    real: int
    padding: int
    ranges: tuple[tuple[int, int], ...]  # per worker: positions [lo, hi) of the epoch's order
    sizes: tuple[tuple[int, ...], ...]  # per worker: its batches' sizes
    slots: tuple[tuple[int, ...], ...]  # per worker: its batches' places in the rank's output


def split(remaining: int, *, rank: int, world_size: int, workers: int, batch_size: int) -> Split:
    """Cut `remaining` samples into `world_size` contiguous runs of equal length (`ceil(R / W)`;
    a rank short of one sample repeats one), so every rank takes the same number of batches;
    a rank's batches are split into contiguous blocks, one per worker, and come out
    round-robin over the workers."""
    quota = -(-remaining // world_size)  # every rank yields this many samples (ceil)
    start = rank * (remaining // world_size) + min(rank, remaining % world_size)
    real = remaining // world_size + (1 if rank < remaining % world_size else 0)
    batches = -(-quota // batch_size)
    sizes = [batch_size] * (batches - 1) + ([quota - (batches - 1) * batch_size] if batches else [])

    workers = max(1, workers)
    per_worker = [batches // workers + (1 if w < batches % workers else 0) for w in range(workers)]
    # Output order: round-robin over the workers' blocks, as a DataLoader would fetch them.
    slots: list[list[int]] = [[] for _ in range(workers)]
    slot = 0
    for j in range(max(per_worker, default=0)):
        for w in range(workers):
            if j < per_worker[w]:
                slots[w].append(slot)
                slot += 1

    ends = np.cumsum([0, *sizes])
    ranges, w_sizes = [], []
    first_batch = 0
    for w in range(workers):
        last_batch = first_batch + per_worker[w]
        lo = start + min(int(ends[first_batch]), real)  # positions past `real` are padding
        hi = start + min(int(ends[last_batch]), real)
        ranges.append((lo, hi))
        w_sizes.append(tuple(sizes[first_batch:last_batch]))
        first_batch = last_batch
    return Split(batches, real, quota - real, tuple(ranges), tuple(w_sizes),
                 tuple(tuple(s) for s in slots))  # fmt: skip


def plan_epoch(
    shards: Sequence[ShardRef],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    workers: int,
    batch_size: int,
    done: np.ndarray | None = None,
    pieces: Pieces | None = None,
) -> RankPlan:
    """Lay out `rank`'s share (`split`) of the epoch's samples not in `done` (intervals of
    global ids). `pieces` (from `epoch_pieces`) saves recomputing the order."""
    if pieces is None:
        pieces = epoch_pieces(shards, seed=seed, epoch=epoch, done=done)
    sp = split(pieces.total, rank=rank, world_size=world_size, workers=workers,
               batch_size=batch_size)  # fmt: skip
    plans = tuple(
        WorkerPlan(pieces.slice(lo, hi), sizes, slots)
        for (lo, hi), sizes, slots in zip(sp.ranges, sp.sizes, sp.slots, strict=True)
    )
    return RankPlan(sp.batches, sp.real, sp.padding, plans)


def plan_runs(
    shards: Sequence[ShardRef],
    runs: Sequence[np.ndarray],
    *,
    remaining: int,
    rank: int,
    world_size: int,
    batch_size: int,
) -> RankPlan:
    """The plan of a layout made from what an earlier layout left (`runs`: per worker, its
    reading order as (first global id, length) runs; `remaining`: the samples shared)."""
    sp = split(remaining, rank=rank, world_size=world_size, workers=len(runs),
               batch_size=batch_size)  # fmt: skip
    plans = tuple(
        WorkerPlan(segments_of(shards, r), sizes, slots)
        for r, sizes, slots in zip(runs, sp.sizes, sp.slots, strict=True)
    )
    return RankPlan(sp.batches, sp.real, sp.padding, plans)


# ---------------------------------------------------------------------------------------------
# Runs: a reading order as (first global id, length) pairs


def runs_of(shards: Sequence[ShardRef], segments: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """(first global id, length) runs of (shard, first, end) segments, in the same order."""
    out = [(shards[s].offset + f, e - f) for s, f, e in segments]
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def segments_of(shards: Sequence[ShardRef], runs: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """(shard, first, end) segments of runs; a run never crosses a shard boundary."""
    if not len(runs):
        return ()
    offsets = np.array([s.offset for s in shards], dtype=np.int64)
    shard = np.searchsorted(offsets, runs[:, 0], side="right") - 1
    first = runs[:, 0] - offsets[shard]
    return tuple(
        (int(s), int(f), int(f + n)) for s, f, n in zip(shard, first, runs[:, 1], strict=True)
    )


def slice_runs(runs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Positions [lo, hi) of a reading order, as runs."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    cum = np.concatenate([[0], np.cumsum(runs[:, 1])])
    lo, hi = max(lo, 0), min(hi, int(cum[-1]))
    if hi <= lo:
        return np.zeros((0, 2), dtype=np.int64)
    k0 = int(np.searchsorted(cum, lo, side="right")) - 1
    k1 = int(np.searchsorted(cum, hi, side="left"))
    part = runs[k0:k1].copy()
    head = lo - int(cum[k0])
    part[0, 0] += head
    part[0, 1] -= head
    part[-1, 1] -= int(cum[k1]) - hi
    return part


def compact(runs: np.ndarray) -> np.ndarray:
    """The same reading order in fewer runs: runs that continue each other are joined."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if len(runs) < 2:
        return runs.copy()
    joins = runs[1:, 0] == runs[:-1, 0] + runs[:-1, 1]
    starts = np.flatnonzero(np.concatenate([[True], ~joins]))
    lengths = np.add.reduceat(runs[:, 1], starts)
    return np.stack([runs[starts, 0], lengths], axis=1)


class RawIndex:
    """One worker's reading order (runs): a sample's position in it, and the ids at positions."""

    def __init__(self, runs: np.ndarray):
        runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        self.gid = runs[:, 0]
        self.cum = np.concatenate([[0], np.cumsum(runs[:, 1])]).astype(np.int64)
        self.by_gid = np.argsort(self.gid, kind="stable")
        self.length = int(self.cum[-1])

    def positions(self, gids: np.ndarray) -> np.ndarray:
        """Reading positions of samples of this worker's stretch."""
        gids = np.asarray(gids, dtype=np.int64)
        k = self.by_gid[np.searchsorted(self.gid[self.by_gid], gids, side="right") - 1]
        return self.cum[k] + (gids - self.gid[k])

    def gids(self, positions: np.ndarray) -> np.ndarray:
        """Global ids at reading positions."""
        positions = np.asarray(positions, dtype=np.int64)
        k = np.searchsorted(self.cum, positions, side="right") - 1
        return self.gid[k] + (positions - self.cum[k])


def remainder(runs: np.ndarray, read: int, pending: np.ndarray) -> np.ndarray:
    """What a worker left of its reading order (runs) after reading `read` samples of which
    those at `pending` positions were not consumed: those, in reading order, then the rest."""
    index = RawIndex(runs)
    held = np.sort(np.asarray(pending, dtype=np.int64))
    held_runs = np.stack([index.gids(held), np.ones(len(held), dtype=np.int64)], axis=1)
    return compact(np.concatenate([held_runs, slice_runs(runs, read, index.length)]))

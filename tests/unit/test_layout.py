"""The epoch layout's interval arithmetic and reading orders, against brute-force sets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import layout
from pipeline.data.layout import RawIndex, ShardRef, epoch_pieces, plan_epoch


def from_points(points) -> np.ndarray:
    """Intervals holding exactly the given ids."""
    p = np.unique(np.asarray(points, dtype=np.int64))
    if not len(p):
        return layout.EMPTY.copy()
    breaks = np.flatnonzero(np.diff(p) != 1)
    starts = np.concatenate([[p[0]], p[breaks + 1]])
    ends = np.concatenate([p[breaks], [p[-1]]]) + 1
    return np.stack([starts, ends], axis=1)


def ids(intervals: np.ndarray) -> set[int]:
    return {i for a, b in intervals for i in range(a, b)}


def refs(sizes: list[int]) -> list[ShardRef]:
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [
        ShardRef(f"s{i}", n, int(o)) for i, (n, o) in enumerate(zip(sizes, offsets, strict=True))
    ]


@pytest.mark.parametrize("seed", range(5))
def test_interval_algebra_matches_sets(seed):
    rng = np.random.default_rng(seed)
    points = rng.choice(200, size=rng.integers(0, 120), replace=False)
    iv = from_points(points)
    assert ids(iv) == set(points.tolist())
    assert layout.count(iv) == len(points)
    assert np.all(iv[1:, 0] > iv[:-1, 1])  # disjoint and not touching
    assert ids(layout.complement(iv, 200)) == set(range(200)) - set(points.tolist())
    mask = np.zeros(200, dtype=bool)
    mask[points] = True
    assert np.array_equal(layout.from_bitmap(mask), iv)
    halves = [from_points(points[: len(points) // 2]), from_points(points[1::2])]
    assert np.array_equal(layout.union(*halves, None), layout.merge(np.concatenate(halves)))
    assert ids(layout.union(*halves)) == ids(halves[0]) | ids(halves[1])


@pytest.mark.parametrize("seed", range(4))
def test_pieces_hold_the_samples_not_done_in_shard_order(seed):
    rng = np.random.default_rng(seed)
    sizes = [7, 0, 13, 1, 20, 0, 9]
    shards = refs(sizes)
    done_points = rng.choice(50, size=rng.integers(0, 50), replace=False)
    done = from_points(done_points)
    pieces = epoch_pieces(shards, seed=seed, epoch=2, done=done)
    full = epoch_pieces(shards, seed=seed, epoch=2)
    order = []
    for s, f, e in zip(pieces.shard, pieces.first, pieces.end, strict=True):
        order += [shards[s].offset + i for i in range(f, e)]
    expected = []
    for s, f, e in zip(full.shard, full.first, full.end, strict=True):
        expected += [
            shards[s].offset + i for i in range(f, e) if shards[s].offset + i not in ids(done)
        ]
    assert order == expected
    assert pieces.total == 50 - len(done_points)


def order_of(runs: np.ndarray) -> list[int]:
    return [g for start, n in runs for g in range(start, start + n)]


def test_reading_orders_as_runs_positions_and_remainders():
    shards = refs([7, 13, 1, 20, 9])
    plan = plan_epoch(
        shards, seed=3, epoch=0, rank=1, world_size=2, workers=2, batch_size=4,
        done=from_points([0, 1, 2, 30, 31]),
    )  # fmt: skip
    for w in plan.workers:
        order = [shards[s].offset + i for s, f, e in w.segments for i in range(f, e)]
        runs = layout.runs_of(shards, w.segments)
        assert order_of(runs) == order
        assert layout.segments_of(shards, runs) == w.segments
        index = RawIndex(runs)
        assert index.positions(np.array(order)).tolist() == list(range(len(order)))
        assert index.gids(np.arange(len(order))).tolist() == order
        for lo in range(len(order) + 1):
            for hi in range(lo, len(order) + 2):
                assert order_of(layout.slice_runs(runs, lo, hi)) == order[lo:hi]
        for read in range(len(order) + 1):
            pending = np.array([p for p in (read - 1, read - 3) if p >= 0])
            left = layout.remainder(runs, read, pending)
            assert order_of(left) == [order[p] for p in sorted(pending)] + order[read:]


def test_compact_joins_runs_that_continue_each_other():
    runs = np.array([[5, 1], [6, 2], [8, 1], [20, 3], [2, 1], [3, 1]])
    assert layout.compact(runs).tolist() == [[5, 4], [20, 3], [2, 2]]
    assert order_of(layout.compact(runs)) == order_of(runs)

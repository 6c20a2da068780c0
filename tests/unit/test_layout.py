"""The epoch layout's interval arithmetic and reading orders, against brute-force sets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import layout
from pipeline.data.layout import RawIndex, ShardRef, epoch_pieces, plan_epoch


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
    iv = layout.from_points(points)
    assert ids(iv) == set(points.tolist())
    assert layout.count(iv) == len(points)
    assert np.all(iv[1:, 0] > iv[:-1, 1])  # disjoint and not touching
    assert ids(layout.complement(iv, 200)) == set(range(200)) - set(points.tolist())
    mask = np.zeros(200, dtype=bool)
    mask[points] = True
    assert np.array_equal(layout.from_bitmap(mask), iv)
    halves = [layout.from_points(points[: len(points) // 2]), layout.from_points(points[1::2])]
    assert np.array_equal(layout.union(*halves, None), layout.merge(np.concatenate(halves)))
    assert ids(layout.union(*halves)) == ids(halves[0]) | ids(halves[1])


@pytest.mark.parametrize("seed", range(4))
def test_pieces_hold_the_samples_not_done_in_shard_order(seed):
    rng = np.random.default_rng(seed)
    sizes = [7, 0, 13, 1, 20, 0, 9]
    shards = refs(sizes)
    done_points = rng.choice(50, size=rng.integers(0, 50), replace=False)
    done = layout.from_points(done_points)
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


def test_raw_index_positions_and_consumed_sets():
    shards = refs([7, 13, 1, 20, 9])
    plan = plan_epoch(
        shards, seed=3, epoch=0, rank=1, world_size=2, workers=2, batch_size=4,
        done=layout.from_points([0, 1, 2, 30, 31]),
    )  # fmt: skip
    for w in plan.workers:
        order = [shards[s].offset + i for s, f, e in w.segments for i in range(f, e)]
        index = RawIndex(shards, w.segments)
        assert index.positions(np.array(order)).tolist() == list(range(len(order)))
        for read in range(len(order) + 1):
            pending = np.array([p for p in (read - 1, read - 3) if p >= 0])
            expected = {order[p] for p in range(read)} - {order[p] for p in pending}
            assert ids(index.consumed(read, pending)) == expected

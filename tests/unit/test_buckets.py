"""Resolution buckets and NaViT grouping: shapes, assignment, batch sizes, streaming batchers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import BucketsConfig
from pipeline.data.buckets import (
    Bucket,
    BucketBatcher,
    NaViTBatcher,
    assign_bucket,
    batch_tokens_from_config,
    bucket_batch_sizes,
    buckets_from_config,
    local_shape,
    make_buckets,
    navit_shape,
)
from pipeline.data.packing import pack_images

RATIOS = [0.5, 0.75, 1.0, 4 / 3, 2.0]


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) pairs with log-uniform aspects in [1/3, 3] and sides 40..1600."""
    rng = np.random.default_rng(seed)
    area = rng.uniform(60**2, 1000**2, n)
    aspect = np.exp(rng.uniform(math.log(1 / 3), math.log(3), n))
    widths = np.sqrt(area * aspect).round().astype(int).clip(1)
    heights = np.sqrt(area / aspect).round().astype(int).clip(1)
    return list(zip(widths.tolist(), heights.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# Bucket set.


@pytest.mark.parametrize("stride", [8, 14, 16, 32])
@pytest.mark.parametrize("side", [96, 224, 256])
def test_buckets_are_stride_multiples_near_budget_and_ratio(stride, side):
    budget = side * side
    buckets = make_buckets(RATIOS, budget, stride)
    assert len(set(buckets)) == len(buckets)
    for b in buckets:
        assert b.height % stride == 0 and b.width % stride == 0
        assert b.height >= stride and b.width >= stride
        # Area within one stride row or column of the budget, either side.
        assert abs(b.height * b.width - budget) <= stride * max(b.height, b.width)
        assert b.tokens(stride) == (b.height // stride) * (b.width // stride)
    # Every requested ratio lands on a bucket whose sides are within half a stride of ideal.
    for r in RATIOS:
        h0, w0 = math.sqrt(budget / r), math.sqrt(budget * r)
        assert any(
            abs(b.height - h0) <= stride / 2 and abs(b.width - w0) <= stride / 2 for b in buckets
        )


def test_buckets_at_224_stride_16_are_exact():
    buckets = make_buckets(RATIOS, 224 * 224, 16)
    assert buckets == [
        Bucket(320, 160),
        Bucket(256, 192),
        Bucket(224, 224),
        Bucket(192, 256),
        Bucket(160, 320),
    ]
    for b, r in zip(buckets, RATIOS, strict=True):
        assert b.aspect == pytest.approx(r)


def test_small_grid_keeps_the_ratio_and_duplicates_collapse():
    # 96 px at stride 16: 4/3 stays non-square (5x7 patches).
    assert Bucket(80, 112) in make_buckets([4 / 3], 96 * 96, 16)
    # Near-equal ratios round to one shape; the first request keeps its position.
    buckets = make_buckets([1.0, 1.01, 0.99, 2.0, 2.02, 1.0], 224 * 224, 16)
    assert buckets == [Bucket(224, 224), Bucket(160, 320)]
    # At 9 tokens, 0.75 and 1 both round to 3x3.
    assert make_buckets([0.75, 1.0], 96 * 96, 32) == [Bucket(96, 96)]


def test_make_buckets_rejects_bad_input():
    with pytest.raises(ValueError, match="aspect_ratios"):
        make_buckets([1.0, -2.0], 224 * 224, 16)
    with pytest.raises(ValueError, match="pixel_budget"):
        make_buckets([1.0], 100, 16)


def test_buckets_and_batch_tokens_from_config():
    cfg = BucketsConfig(enabled=True)
    assert buckets_from_config(cfg, 224, 16) == make_buckets(cfg.aspect_ratios, 224 * 224, 16)
    cfg = BucketsConfig(enabled=True, token_budget=256, batch_tokens=5000)
    assert buckets_from_config(cfg, 224, 16) == make_buckets(cfg.aspect_ratios, 256 * 256, 16)
    assert batch_tokens_from_config(cfg, 64, 224, 16) == 5000
    assert batch_tokens_from_config(BucketsConfig(), 64, 224, 16) == 64 * 196
    assert batch_tokens_from_config(BucketsConfig(token_budget=100), 8, 224, 16) == 800


# ---------------------------------------------------------------------------------------------
# Assignment.


def test_assignment_picks_nearest_aspect_in_log_space():
    buckets = make_buckets(RATIOS, 224 * 224, 16)
    aspect = [b.aspect for b in buckets]
    assert aspect[assign_bucket(500, 375, buckets)] == pytest.approx(4 / 3)
    assert aspect[assign_bucket(375, 500, buckets)] == pytest.approx(3 / 4)
    assert aspect[assign_bucket(1000, 500, buckets)] == pytest.approx(2.0)
    assert aspect[assign_bucket(5000, 100, buckets)] == pytest.approx(2.0)
    assert aspect[assign_bucket(100, 5000, buckets)] == pytest.approx(0.5)
    assert aspect[assign_bucket(640, 640, buckets)] == pytest.approx(1.0)
    # 1.65 is nearer 2 than 4/3 in log space (0.192 vs 0.213), though nearer 4/3 linearly.
    assert aspect[assign_bucket(165, 100, buckets)] == pytest.approx(2.0)
    for w, h in random_sizes(300, seed=1):
        i = assign_bucket(w, h, buckets)
        dists = [abs(math.log(w / h) - math.log(a)) for a in aspect]
        assert dists[i] == pytest.approx(min(dists))


def test_assignment_tie_goes_to_the_squarer_bucket():
    # 2:1 sits exactly between aspects 1 and 4 in log space, whichever order they come in.
    for ratios in ([1.0, 4.0], [4.0, 1.0]):
        buckets = make_buckets(ratios, 256 * 256, 16)
        assert buckets[assign_bucket(200, 100, buckets)].aspect == 1.0
    for ratios in ([1.0, 0.25], [0.25, 1.0]):
        buckets = make_buckets(ratios, 256 * 256, 16)
        assert buckets[assign_bucket(100, 200, buckets)].aspect == 1.0
    # Both equally square (0.5 and 2 around a square image): the lower index.
    buckets = make_buckets([2.0, 0.5], 224 * 224, 16)
    assert assign_bucket(300, 300, buckets) == 0


# ---------------------------------------------------------------------------------------------
# Local crops and batch sizes.


@pytest.mark.parametrize("stride", [8, 14, 16])
def test_local_shapes_are_stride_multiples_and_proportional(stride):
    for b in make_buckets(RATIOS, 224 * 224, stride):
        h, w = local_shape(b, 224, 96, stride)
        assert h % stride == 0 and w % stride == 0 and h >= stride and w >= stride
        scale = 96 / 224
        assert abs(h - b.height * scale) <= stride / 2
        assert abs(w - b.width * scale) <= stride / 2
    assert local_shape(Bucket(224, 224), 224, 96, 16) == (96, 96)
    assert local_shape(Bucket(192, 256), 224, 96, 16) == (80, 112)
    # Tiny local crops still get one stride per side.
    assert local_shape(Bucket(160, 320), 224, 8, 16) == (16, 16)


@pytest.mark.parametrize("batch_tokens", [196, 1000, 64 * 196, 12345])
def test_batch_sizes_hold_the_token_budget(batch_tokens):
    stride = 16
    buckets = make_buckets(RATIOS, 224 * 224, stride)
    sizes = bucket_batch_sizes(buckets, batch_tokens, stride)
    for b, n in zip(buckets, sizes, strict=True):
        t = b.tokens(stride)
        assert n >= 1
        if t <= batch_tokens:
            assert n * t <= batch_tokens < (n + 1) * t
        else:
            assert n == 1
    assert bucket_batch_sizes(buckets, 64 * 196, stride) == [62, 65, 64, 65, 62]
    assert bucket_batch_sizes(buckets, 64 * 196, stride, max_batch=63) == [62, 63, 63, 63, 62]
    assert bucket_batch_sizes(buckets, 10, stride) == [1] * 5


# ---------------------------------------------------------------------------------------------
# Streaming bucket batcher.


def run_batcher(items, stride=16, batch_tokens=8 * 196):
    buckets = make_buckets(RATIOS, 224 * 224, stride)
    batcher = BucketBatcher(
        buckets, lambda it: (it[1], it[2]), batch_tokens=batch_tokens, stride=stride
    )
    max_pending = 0
    out = []
    for batch in batcher.batches(items):
        out.append(batch)
        max_pending = max(max_pending, batcher.num_pending)
    return batcher, out, max_pending


def test_bucket_batcher_groups_every_item_once_within_budget():
    items = [(i, w, h) for i, (w, h) in enumerate(random_sizes(1000, seed=2))]
    batcher, out, max_pending = run_batcher(items)
    buckets, sizes = batcher.buckets, batcher.batch_sizes

    seen = [it[0] for batch in out for it in batch.items]
    assert sorted(seen) == list(range(len(items)))
    assert max_pending <= sum(sizes) - len(sizes)
    assert batcher.num_pending == 0
    # Partial batches come only at the end, at most one per bucket.
    n_full = sum(b.full for b in out)
    assert all(b.full for b in out[:n_full]) and not any(b.full for b in out[n_full:])
    assert len({b.bucket for b in out[n_full:]}) == len(out) - n_full
    for batch in out:
        assert all(assign_bucket(w, h, buckets) == batch.bucket for _, w, h in batch.items)
        if batch.full:
            assert len(batch.items) == sizes[batch.bucket]
        else:
            assert 0 < len(batch.items) < sizes[batch.bucket]
        assert len(batch.items) * buckets[batch.bucket].tokens(16) <= batcher.batch_tokens

    s = batcher.stats()
    assert s["samples"] == len(items) == sum(b["samples"] for b in s["buckets"])
    assert s["batches"] == len(out) == s["full_batches"] + s["partial_batches"]
    for i, b in enumerate(s["buckets"]):
        mine = [x for x in out if x.bucket == i]
        assert b["samples"] == sum(len(x.items) for x in mine)
        assert b["full_batches"] == sum(x.full for x in mine)
        assert b["partial_batches"] == sum(not x.full for x in mine)
    waste = [1 - len(x.items) * buckets[x.bucket].tokens(16) / batcher.batch_tokens for x in out]
    assert s["padding_waste_mean"] == pytest.approx(np.mean(waste))
    assert s["padding_waste_total"] == pytest.approx(np.mean(waste))  # equal capacities
    assert s["wasted_tokens"] == pytest.approx(sum(waste) * batcher.batch_tokens)
    assert 0 <= s["padding_waste_mean"] < 1

    lines = batcher.summary().splitlines()
    assert len(lines) == len(buckets)
    for i, b in enumerate(buckets):
        assert f"bucket {i} {b.height}x{b.width}" in lines[i]


def test_bucket_batcher_emits_as_soon_as_full_and_is_deterministic():
    buckets = make_buckets([1.0, 2.0], 224 * 224, 16)
    batcher = BucketBatcher(buckets, lambda s: s, batch_tokens=3 * 200, stride=16)
    assert batcher.batch_sizes == [3, 3]
    assert batcher.add((100, 100)) is None
    assert batcher.add((200, 100)) is None
    assert batcher.add((101, 100)) is None
    batch = batcher.add((102, 100))
    assert batch is not None and batch.bucket == 0 and batch.full
    assert batch.items == [(100, 100), (101, 100), (102, 100)]
    rest = list(batcher.flush())
    assert [(b.bucket, b.items, b.full) for b in rest] == [(1, [(200, 100)], False)]
    assert list(batcher.flush()) == []

    items = [(i, w, h) for i, (w, h) in enumerate(random_sizes(400, seed=3))]
    _, first, _ = run_batcher(items)
    _, second, _ = run_batcher(items)
    assert [(b.bucket, b.items, b.full) for b in first] == [
        (b.bucket, b.items, b.full) for b in second
    ]


def test_bucket_batcher_empty_input():
    batcher, out, _ = run_batcher([])
    assert out == []
    s = batcher.stats()
    assert s["samples"] == s["batches"] == 0 and s["padding_waste_mean"] == 0.0


# ---------------------------------------------------------------------------------------------
# NaViT.


def test_navit_shapes_cap_round_and_never_upscale():
    patch, max_side = 16, 512
    for w, h in [*random_sizes(500, seed=4), (1, 1), (5000, 10), (10, 5000), (520, 520)]:
        sh, sw = navit_shape(w, h, patch, max_side)
        assert sh % patch == 0 and sw % patch == 0 and sh >= patch and sw >= patch
        assert max(sh, sw) <= max_side
        scale = min(1.0, max_side / max(w, h))
        # Rounding moves each side by at most half a patch from the scaled size (or to 1 patch).
        assert sh <= max(patch, h * scale + patch / 2) and sw <= max(patch, w * scale + patch / 2)
    # Small images stay at their own size (rounded), not blown up to max_side.
    assert navit_shape(64, 48, 16, 512) == (48, 64)
    assert navit_shape(100, 60, 16, 512) == (64, 96)
    assert navit_shape(1024, 768, 16, 512) == (384, 512)
    assert navit_shape(530, 530, 16, 520) == (512, 512)  # 520 / 16 = 32.5 must not round up
    with pytest.raises(ValueError, match="max_side"):
        navit_shape(100, 100, 16, 8)


def test_navit_shape_shrinks_to_fit_a_token_cap():
    for w, h in [(1024, 768), (2000, 300), (300, 2000), (512, 512), (640, 17)]:
        sh, sw = navit_shape(w, h, 16, 512, max_tokens=100)
        assert (sh // 16) * (sw // 16) <= 100
        # Aspect kept roughly: within one patch per side of the ideal proportions.
        assert abs(sw / sh - w / h) <= (w / h) * (16 / min(sh, sw) + 16 / max(sh, sw)) + 1e-9
    assert navit_shape(512, 512, 16, 512, max_tokens=100) == (160, 160)
    assert navit_shape(64, 48, 16, 512, max_tokens=100) == (48, 64)  # already fits


@pytest.mark.parametrize("prefix", [0, 1])
def test_navit_batches_pack_into_the_rows_and_keep_every_item(prefix):
    patch, max_side, seq_len, seqs = 16, 256, 160, 3
    sizes = [*random_sizes(120, seed=5), (2000, 2000)]  # 16x16 patches > seq_len: shrunk
    items = [(i, w, h) for i, (w, h) in enumerate(sizes)]
    batcher = NaViTBatcher(
        lambda it: (it[1], it[2]),
        patch=patch,
        max_side=max_side,
        seq_len=seq_len,
        seqs_per_batch=seqs,
        num_prefix_tokens=prefix,
    )
    out = list(batcher.batches(items))

    seen = [it[0] for batch in out for it, _ in batch.items]
    assert seen == list(range(len(items)))  # arrival order, each once
    for k, batch in enumerate(out):
        assert batch.full == (k < len(out) - 1)
        for (_, w, h), shape in batch.items:
            assert shape == batcher.shape_of(w, h)
            assert (shape[0] // patch) * (shape[1] // patch) + prefix <= seq_len
        images = [torch.zeros(3, sh, sw, dtype=torch.uint8) for _, (sh, sw) in batch.items]
        packed = pack_images(images, patch, max_len=seq_len, num_prefix_tokens=prefix)
        assert packed.patches.shape[0] == batch.rows <= seqs
        assert packed.num_images == len(batch.items)
        assert int((packed.image_ids >= 0).sum()) == batch.tokens
        if batch.full:
            # The item that opened the next batch fit in none of this batch's rows.
            _, w, h = out[k + 1].items[0][0]
            sh, sw = batcher.shape_of(w, h)
            need = prefix + (sh // patch) * (sw // patch)
            assert batch.rows == seqs
            used = (packed.image_ids >= 0).sum(dim=1)
            assert all(int(u) + need > seq_len for u in used)

    s = batcher.stats()
    assert s["images"] == len(items) and s["batches"] == len(out) and s["pending"] == 0
    assert s["shrunk"] >= 1 and s["capped"] >= 1
    fills = [b.tokens / (seqs * seq_len) for b in out]
    assert s["fill_mean"] == pytest.approx(np.mean(fills))
    assert 0 < s["fill_mean"] <= 1 and 0 < s["row_fill_mean"] <= 1
    assert s["images_per_batch_mean"] == pytest.approx(len(items) / len(out))
    assert "fill" in batcher.summary()


def test_navit_batcher_rejects_a_sequence_without_room():
    with pytest.raises(ValueError, match="seq_len"):
        NaViTBatcher(
            lambda s: s, patch=16, max_side=256, seq_len=1, seqs_per_batch=2, num_prefix_tokens=1
        )

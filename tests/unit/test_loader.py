"""Loaders built from recipes, end to end on real JPEG shards: multicrop, MAE, buckets, NaViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_recipe
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.packing import PackedBatch
from pipeline.data.shards import write_shards
from pipeline.data.transforms import DeviceAugment, normalize
from pipeline.models.vit import VisionTransformer

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "debug" / "dino_tiny.yaml"
SIZES = [(64, 48), (48, 64), (96, 48), (40, 40), (80, 60), (50, 100)]  # (width, height)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "src" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            w, h = SIZES[i % len(SIZES)]
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "src" / f"class{c}" / f"{i}.jpg", quality=90)
    write_shards(root / "src", root / "shards", shard_size=7, progress=False)
    return str(root / "shards")


def recipe(shards: str, *overrides: str):
    return load_recipe(RECIPE, [f"data.train.shards={shards}", "data.workers=2", *overrides])


def loader_for(r, **kw):
    return build_train_loader(
        r.data,
        method=r.method.name,
        stride=8,
        batch_size=kw.pop("batch_size", 4),
        rank=kw.pop("rank", 0),
        world_size=kw.pop("world_size", 1),
        seed=0,
        **kw,
    )


def test_dino_multicrop_batches(shards):
    r = recipe(shards)
    batches = list(loader_for(r))
    assert len(batches) == 6  # 24 images / 4
    crops = r.data.crops
    for b in batches:
        views = b["views"]
        assert len(views) == 2 + crops.local_number
        for i, v in enumerate(views):
            side = crops.global_size if i < 2 else crops.local_size
            assert v.shape == (4, 4, side, side) and v.dtype == torch.uint8  # RGBX
        assert set(b["label"].tolist()) <= {0, 1}
    aug = DeviceAugment(r.data.color)
    out = aug(batches[0]["views"], torch.Generator().manual_seed(0))
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)
    assert all(float(o.min()) > -3.0 and float(o.max()) < 3.0 for o in out)


def test_mae_batches(shards):
    r = recipe(shards, "method.name=mae")
    b = next(iter(loader_for(r)))
    size = r.data.crops.mae_size
    assert len(b["views"]) == 1 and b["views"][0].shape == (4, 4, size, size)
    x = normalize(b["views"], r.data.color.mean, r.data.color.std)[0]
    assert x.dtype == torch.float32


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_bucketed_batches_hold_one_shape_and_the_token_budget(shards, method):
    r = recipe(shards, f"method.name={method}", "data.buckets.enabled=true")
    ld = loader_for(r, batch_size=4)
    batches = list(ld)
    assert sum(len(b["id"]) for b in batches) == 24
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(24))
    crop = r.data.crops.global_size if method == "dino" else r.data.crops.mae_size
    budget = 4 * (crop // 8) ** 2
    shapes = set()
    for b in batches:
        first = b["views"][0]
        n, _, h, w = first.shape
        assert h % 8 == 0 and w % 8 == 0
        assert n * (h // 8) * (w // 8) <= budget
        shapes.add((h, w))
        if method == "dino":  # locals follow the bucket's shape, scaled
            lh, lw = b["views"][2].shape[-2:]
            assert (lh >= lw) == (h >= w) or lh == lw
    assert len(shapes) >= 3, "images of several aspect ratios land in several buckets"


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_navit_batches_pack_and_run_through_a_vit(shards, method):
    r = recipe(
        shards,
        f"method.name={method}",
        "data.buckets.navit=true",
        "data.buckets.max_side=64",
        "data.buckets.seq_len=96",
    )
    ld = loader_for(r, batch_size=2, num_prefix_tokens=0)
    batches = list(ld)
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(24))
    vit = VisionTransformer(
        embed_dim=32,
        depth=1,
        num_heads=2,
        patch_size=8,
        img_size=32,
        class_token=False,
        pool="mean",
    )
    views = 2 + r.data.crops.local_number if method == "dino" else 1
    for b in batches:
        assert len(b["views"]) == views  # one pack per view
        for i, packed in enumerate(b["views"]):
            assert isinstance(packed, PackedBatch) and packed.patches.dtype == torch.uint8
            assert packed.patches.shape[0] <= 2 and packed.patches.shape[1] == 96
            _, pooled = vit.forward_packed(packed.float())
            assert pooled.shape == (len(b["id"]), 32)
            if i >= 2:  # DINO's locals: each image's global shape, scaled down
                local, glob = packed.grids.prod(-1).sum(), b["views"][0].grids.prod(-1).sum()
                assert local < glob


def test_eval_loader_is_ordered_and_complete(shards):
    r = recipe(shards)
    ld = build_eval_loader(r.data, shards, batch_size=5, rank=0, world_size=1)
    batches = list(ld)
    assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(24))
    crop = r.data.eval_crop
    assert all(b["views"][0].shape[-2:] == (crop, crop) for b in batches)
    again = list(build_eval_loader(r.data, shards, batch_size=5, rank=0, world_size=1))
    assert all(
        torch.equal(a["views"][0], b["views"][0]) for a, b in zip(batches, again, strict=True)
    )

"""Crops cut on the device (`data.crops.on_device`): the same views as the CPU path, from the same
seeded boxes, on real JPEG shards; batches through the real loader; exact epochs and resume."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import CropsConfig, load_recipe
from pipeline.data.device_crops import (
    CropBatch,
    Decoded,
    collate_decoded,
    cut_views,
    device_views,
    to_device,
)
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.shards import write_shards
from pipeline.data.transforms import DinoCrops, EvalCrop, MaeCrop, _crop_resize

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "debug" / "dino_tiny.yaml"
# (width, height): upscaled and downscaled crops, both orientations, one large enough for draft.
SIZES = [(64, 48), (48, 64), (96, 48), (40, 40), (160, 120), (400, 300)]
TOLERANCE = 2  # grey levels: the CPU path rounds between its two passes, the device path once
CROPS = CropsConfig(global_size=32, local_size=16, local_number=3, mae_size=32)


def noise_jpeg(width: int, height: int, seed: int) -> bytes:
    """Random pixels: every one-pixel shift of a crop changes it by far more than the tolerance."""
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [noise_jpeg(w, h, i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("device_crops")
    for c in range(2):
        (root / "src" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            w, h = SIZES[i % len(SIZES)]
            data = noise_jpeg(w, h, 100 * c + i)
            (root / "src" / f"class{c}" / f"{i}.jpg").write_bytes(data)
    write_shards(root / "src", root / "shards", shard_size=7, progress=False)
    return str(root / "shards")


def max_diff(device: list[torch.Tensor], cpu: list[torch.Tensor]) -> list[int]:
    """Per view: the largest difference in grey levels between uint8 (B, 3, h, w) device views
    and (B, 4, h, w) RGBX CPU views."""
    assert [tuple(d.shape[-2:]) for d in device] == [tuple(c.shape[-2:]) for c in cpu]
    return [int((d.int() - c[:, :3].int()).abs().max()) for d, c in zip(device, cpu, strict=True)]


def cpu_views(samples: list[list[np.ndarray]]) -> list[torch.Tensor]:
    return [
        torch.from_numpy(np.stack([s[i] for s in samples])).permute(0, 3, 1, 2)
        for i in range(len(samples[0]))
    ]


def shifted(batch: CropBatch, views: list[int]) -> CropBatch:
    """The same batch with the boxes of `views` one pixel to the right (left at the right edge)."""
    boxes = batch.boxes.clone()
    for v in views:
        x0, x1 = boxes[:, v, 0], boxes[:, v, 2]
        step = torch.where(x1 < batch.sizes[:, 1], 1, -1).to(boxes.dtype)
        boxes[:, v, 0], boxes[:, v, 2] = x0 + step, x1 + step
    return replace(batch, boxes=boxes)


def check_same_views(
    make_cpu, make_device, images: list[bytes], shift: bool = True, **shape
) -> CropBatch:
    """Device crops of a batch equal the CPU path's crops of the same seeded boxes; the same boxes
    shifted by one pixel do not (checked with `shift`). Returns the batch."""
    cpu = cpu_views([make_cpu(d, np.random.default_rng(i), **shape) for i, d in enumerate(images)])
    decoded = [make_device(d, np.random.default_rng(i), **shape) for i, d in enumerate(images)]
    assert all(isinstance(d, Decoded) for d in decoded)
    batch = collate_decoded(decoded)
    assert max(max_diff(cut_views(batch), cpu)) <= TOLERANCE
    for v in range(len(cpu) if shift else 0):
        off = max_diff(cut_views(shifted(batch, [v])), cpu)
        assert off[v] > TOLERANCE, f"view {v} shifted by one pixel still passes ({off[v]})"
    return batch


def test_dino_views_match_the_cpu_path(images):
    batch = check_same_views(DinoCrops(CROPS), DinoCrops(CROPS, on_device=True), images)
    assert batch.out_hw == ((32, 32),) * 2 + ((16, 16),) * 3
    assert batch.flips.any() and not batch.flips.all()
    # The 400x300 image was decoded at a draft scale: its boxes allow it.
    assert tuple(batch.sizes[-1].tolist()) != (300, 400)


def test_dino_default_sizes_and_bucket_shapes_match(images):
    default = CropsConfig()
    check_same_views(DinoCrops(default), DinoCrops(default, on_device=True), images, shift=False)
    shape = {"global_hw": (24, 40), "local_hw": (8, 16)}  # a wide bucket and its local shape
    batch = check_same_views(DinoCrops(CROPS), DinoCrops(CROPS, on_device=True), images, **shape)
    assert batch.out_hw == ((24, 40),) * 2 + ((8, 16),) * 3


def test_mae_and_eval_views_match_the_cpu_path(images):
    check_same_views(MaeCrop(CROPS), MaeCrop(CROPS, on_device=True), images)
    check_same_views(MaeCrop(CROPS), MaeCrop(CROPS, on_device=True), images, hw=(40, 24))
    check_same_views(EvalCrop(36, 32), EvalCrop(36, 32, on_device=True), images)


def test_max_side_ships_smaller_images_cut_alike(images):
    crops = replace(CROPS, device_max_side=50)
    decoded = [DinoCrops(crops, on_device=True)(d, np.random.default_rng(i)) for i, d in
               enumerate(images)]  # fmt: skip
    plain = [DinoCrops(CROPS, on_device=True)(d, np.random.default_rng(i)) for i, d in
             enumerate(images)]  # fmt: skip
    for d, p in zip(decoded, plain, strict=True):
        assert d.flips == p.flips
        assert max(d.pixels.shape) <= 50
        if max(p.pixels.shape) <= 50:
            assert d.boxes == p.boxes and d.pixels.shape == p.pixels.shape
    assert sum(d.pixels.shape != p.pixels.shape for d, p in zip(decoded, plain, strict=True)) >= 3
    # The same antialias definition on the same shipped pixels and boxes: CPU and device agree.
    batch = collate_decoded(decoded)
    cpu = cpu_views([_crop_resize(d.pixels, d.boxes, d.out_hw, d.flips) for d in decoded])
    assert max(max_diff(cut_views(batch), cpu)) <= TOLERANCE


def test_collate_pads_and_counts_bytes(images):
    decoded = [MaeCrop(CROPS, on_device=True)(d, np.random.default_rng(0)) for d in images[:3]]
    batch = collate_decoded(decoded)
    assert batch.images.shape == (3, 64, 96, 4) and batch.images.dtype == torch.uint8
    assert tuple(batch.sizes.tolist()[0]) == (48, 64)
    assert int(batch.images[0, 48:].abs().sum()) == 0 and int(batch.images[0, :, 64:].sum()) == 0
    assert batch.pixel_bytes == (64 * 48 + 48 * 64 + 96 * 48) * 4
    assert batch.nbytes == 3 * 64 * 96 * 4 + 3 * 2 * 4 + 3 * 4 * 4 + 3
    with pytest.raises(ValueError, match="same view shapes"):
        collate_decoded([decoded[0], decoded[1]._replace(out_hw=[(8, 8)])])


def recipe(shards: str, *overrides: str):
    return load_recipe(RECIPE, [f"data.train.shards={shards}", "data.workers=2", *overrides])


def loader_for(r, **kw):
    return build_train_loader(
        r.data, method=r.method.name, stride=8, batch_size=kw.pop("batch_size", 4),
        rank=kw.pop("rank", 0), world_size=kw.pop("world_size", 1), seed=0, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [(), ("method.name=mae",), ("data.buckets.enabled=true",),
     ("method.name=mae", "data.buckets.enabled=true")],
)  # fmt: skip
def test_loader_batches_on_device_match_the_cpu_path(shards, overrides):
    on = list(loader_for(recipe(shards, "data.crops.on_device=true", *overrides)))
    off = list(loader_for(recipe(shards, "data.crops.on_device=false", *overrides)))
    assert len(on) == len(off)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a["id"], b["id"])
        assert isinstance(a["views"], CropBatch)
        assert max(max_diff(device_views(to_device(a["views"], torch.device("cpu"))),
                            b["views"])) <= TOLERANCE  # fmt: skip


def test_eval_loader_on_device_matches(shards):
    r = recipe(shards)
    on = list(build_eval_loader(r.data, shards, batch_size=5, rank=0, world_size=1, on_device=True))
    off = list(build_eval_loader(r.data, shards, batch_size=5, rank=0, world_size=1))
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a["id"], b["id"])
        assert max(max_diff(cut_views(a["views"]), b["views"])) <= TOLERANCE


def test_objective_augment_cuts_a_crop_batch(shards):
    from pipeline.train.objectives import build_objective

    for method in ("dino", "mae"):
        r = recipe(shards, "data.crops.on_device=true", f"method.name={method}")
        batch = next(iter(loader_for(r)))
        augment = build_objective(r).augment
        views = augment(to_device(batch["views"], torch.device("cpu")), torch.Generator())
        sizes = [(32, 32)] * 2 + [(16, 16)] * 2 if method == "dino" else [(32, 32)]
        assert [tuple(v.shape) for v in views] == [(4, 3, *hw) for hw in sizes]
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


# Exact epochs and resume with on_device: the stream's guarantees hold for crop batches too.


def ids_of(batches) -> list[int]:
    return [i for b in batches for i in b["id"].tolist() if i >= 0]


def test_exact_epoch_two_ranks_sees_every_sample_once(shards):
    r = recipe(shards, "data.crops.on_device=true")
    ranks = [loader_for(r, rank=k, world_size=2) for k in range(2)]
    for _ in range(2):
        per_rank = [list(ld) for ld in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 3  # ceil(12 / 4)
        assert sorted(ids_of(per_rank[0]) + ids_of(per_rank[1])) == list(range(24))
        assert all(isinstance(b["views"], CropBatch) for p in per_rank for b in p)


def test_resume_same_layout_replays_bitwise_views(shards):
    r = recipe(shards, "data.crops.on_device=true")
    full = list(loader_for(r, batch_size=3))
    first = loader_for(r, batch_size=3)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = loader_for(r, batch_size=3)
    resumed.load_state_dict([first.state_dict()])
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:], strict=True):
        assert torch.equal(a["id"], b["id"])
        assert torch.equal(a["views"].boxes, b["views"].boxes)
        assert torch.equal(a["views"].flips, b["views"].flips)
        for x, y in zip(cut_views(a["views"]), cut_views(b["views"]), strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 3)])
def test_resume_at_another_world_size_sees_every_sample_once(shards, before, after):
    r = recipe(shards, "data.crops.on_device=true")
    seen = []
    old = [loader_for(r, rank=k, world_size=before, batch_size=2) for k in range(before)]
    for ld in old:
        it = iter(ld)
        seen += ids_of(next(it) for _ in range(2))
    states = [ld.state_dict() for ld in old]
    new = [loader_for(r, rank=k, world_size=after, batch_size=2) for k in range(after)]
    for ld in new:
        ld.load_state_dict(states)
    rests = [list(ld) for ld in new]
    assert len({len(x) for x in rests}) == 1
    seen += [i for x in rests for i in ids_of(x)]
    assert sorted(seen) == list(range(24))


def test_prefetch_runs_one_batch_ahead_and_is_not_consumed(shards):
    r = recipe(shards, "data.crops.on_device=true")
    ld = loader_for(r, batch_size=4)
    prefetched: list[list[int]] = []
    ld.prefetch = lambda batch: prefetched.append(batch["id"].tolist()) or batch
    it = iter(ld)
    first = next(it)
    # The second batch was already handed to prefetch (its copy would run during step one)...
    assert len(prefetched) == 2 and prefetched[0] == first["id"].tolist()
    # ...but the position counts only what was handed out: a resume replays the second batch.
    state = ld.state_dict()
    assert state["batches"] == 1
    resumed = loader_for(r, batch_size=4)
    resumed.load_state_dict([state])
    assert next(iter(resumed))["id"].tolist() == prefetched[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cut_matches_cpu_and_prefetch_copies(images):
    from pipeline.data.device_crops import DevicePrefetch

    make = DinoCrops(CropsConfig(), on_device=True)
    batch = collate_decoded([make(d, np.random.default_rng(i)) for i, d in enumerate(images)])
    cuda = torch.device("cuda", torch.cuda.current_device())
    moved = DevicePrefetch(cuda)({"views": batch.pin_memory()})["views"]
    assert moved.ready is not None
    on_gpu = [v.cpu() for v in cut_views(to_device(moved, cuda))]
    cpu = cpu_views([DinoCrops(CropsConfig())(d, np.random.default_rng(i)) for i, d in
                     enumerate(images)])  # fmt: skip
    assert max(max_diff(on_gpu, cpu)) <= TOLERANCE

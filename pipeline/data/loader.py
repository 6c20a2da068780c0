"""Loaders from a recipe's `data` section: which crops, which batching, for which method.

This is the one place that maps recipe keys to data parts: DINO multicrop or the MAE crop on the
CPU side, then fixed-size batches, aspect-ratio buckets (`data.buckets.enabled`) or NaViT packed
sequences (`data.buckets.navit`). Runtime facts (rank, world size, the input stride of the
backbone) are passed in; nothing here imports models or talks to other ranks.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.buckets import (
    Bucket,
    BucketBatcher,
    NaViTBatcher,
    batch_tokens_from_config,
    buckets_from_config,
    local_shape,
)
from pipeline.data.device_crops import DevicePrefetch, collate_decoded
from pipeline.data.packing import PackedBatch, pack_images
from pipeline.data.stream import ShardLoader
from pipeline.data.transforms import DinoCrops, EvalCrop, MaeCrop, ResizeTo, collate_views

log = logging.getLogger(__name__)


def original_size(sample: dict) -> tuple[int, int]:
    """(width, height) before any shrinking: from the shard's json, else the image header."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        return int(meta["width"]), int(meta["height"])
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as im:
                return im.size
    raise KeyError(f"sample {sample.get('__key__')} has neither json nor an image")


class BucketGrouper:
    """Groups raw samples by aspect bucket; crops take the bucket's shape (locals a scaled one)."""

    def __init__(
        self,
        data: DataConfig,
        method: str,
        stride: int,
        batch_size: int,
    ) -> None:
        crop = data.crops.global_size if method == "dino" else data.crops.mae_size
        self.buckets = buckets_from_config(data.buckets, crop, stride)
        self.batch_tokens = batch_tokens_from_config(data.buckets, batch_size, crop, stride)
        self.stride = stride
        self.shapes: list[dict[str, Any]] = []
        for b in self.buckets:
            hw = (b.height, b.width)
            if method == "dino":
                local = local_shape(b, data.crops.global_size, data.crops.local_size, stride)
                self.shapes.append({"global_hw": hw, "local_hw": local})
            else:
                self.shapes.append({"hw": hw})

    def __call__(self, samples: Iterator[dict]) -> Iterator[list[tuple[dict, dict[str, Any]]]]:
        batcher = BucketBatcher(
            self.buckets, original_size, batch_tokens=self.batch_tokens, stride=self.stride
        )
        for batch in batcher.batches(samples):
            yield [(item, self.shapes[batch.bucket]) for item in batch.items]
        log.info("bucket statistics:\n%s", batcher.summary())


class NaViTGrouper:
    """Groups raw samples into packed sequences at their (capped) native resolution.

    Each image's shape comes from `navit_shape`; MAE takes the whole image at it, DINO its
    global crops at it and its local crops at that shape scaled by local_size / global_size
    (about the native resolution of a local crop's box, as `local_shape` does for buckets).
    """

    def __init__(
        self, data: DataConfig, method: str, patch: int, seqs_per_batch: int, prefix: int
    ) -> None:
        self.kw = dict(
            patch=patch,
            max_side=data.buckets.max_side,
            seq_len=data.buckets.seq_len,
            seqs_per_batch=seqs_per_batch,
            num_prefix_tokens=prefix,
        )
        self.method, self.crops = method, data.crops

    def shape(self, hw: tuple[int, int]) -> dict[str, Any]:
        """The transform's keywords for an image of navit shape `hw`."""
        if self.method != "dino":
            return {"hw": hw}
        c, patch = self.crops, self.kw["patch"]
        local = local_shape(Bucket(*hw), c.global_size, c.local_size, patch)
        return {"global_hw": hw, "local_hw": (min(local[0], hw[0]), min(local[1], hw[1]))}

    def __call__(self, samples: Iterator[dict]) -> Iterator[list[tuple[dict, dict[str, Any]]]]:
        batcher = NaViTBatcher(original_size, **self.kw)
        for batch in batcher.batches(samples):
            yield [(item, self.shape(hw)) for item, hw in batch.items]
        log.info("NaViT packing statistics:\n%s", batcher.summary())


class PackCollate:
    """NaViT collate: uint8 views -> one `PackedBatch` of uint8 patches per view index.

    The grouper sized each group so that one view per image fills at most the batch's rows;
    packing each view on its own keeps that bound for every view (DINO's local crops are
    smaller still) and lets the teacher take the global views' packs alone.
    """

    def __init__(self, patch: int, seq_len: int, prefix: int) -> None:
        self.patch, self.seq_len, self.prefix = patch, seq_len, prefix

    def __call__(self, views: list[list[np.ndarray]]) -> list[PackedBatch]:
        # (3, H, W) uint8 views of the (H, W, 4) RGBX arrays; patchify copies them.
        return [
            pack_images(
                [torch.from_numpy(v[i][..., :3]).permute(2, 0, 1) for v in views],
                self.patch,
                self.seq_len,
                self.prefix,
            )
            for i in range(len(views[0]))
        ]


def crops_on_device(data: DataConfig) -> bool:
    """Whether the training crops are cut on the device: `data.crops.on_device`, and where it is
    null, when the training device is a GPU. NaViT packing always cuts on the CPU."""
    if data.buckets.navit:
        return False
    if data.crops.on_device is None:
        return torch.cuda.is_available()
    return data.crops.on_device


def _device_kwargs(on_device: bool) -> dict[str, Any]:
    """Pinned batches and a one-batch-ahead copy to this rank's GPU, for crops cut there."""
    if not (on_device and torch.cuda.is_available()):
        return {}
    device = torch.device("cuda", torch.cuda.current_device())
    return {"pin_memory": True, "prefetch": DevicePrefetch(device)}


UPSAMPLE_WARN = 2.0  # warn when crops enlarge the stored images more than this, on average
_SIZE_SAMPLES = 64  # json records read from the first shard to estimate the stored size
_warned_upsample: set[str] = set()


def stored_side(shards: str, limit: int = _SIZE_SAMPLES) -> float | None:
    """Mean sqrt(width x height) of the first `limit` images of the first shard, from their json
    (`stored_width`/`stored_height` when the image was shrunk); None when it cannot be read."""
    import tarfile

    from pipeline.data.stream import resolve_shards

    try:
        sides = []
        with tarfile.open(resolve_shards(shards)[0].url) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                w = meta.get("stored_width", meta["width"])
                h = meta.get("stored_height", meta["height"])
                sides.append((int(w) * int(h)) ** 0.5)
                if len(sides) >= limit:
                    break
    except (OSError, KeyError, ValueError, IndexError, tarfile.TarError):
        return None  # an estimate for a warning: the stream reports real problems itself
    return sum(sides) / len(sides) if sides else None


def upsampling(data: DataConfig, method: str, side: float) -> dict[str, float]:
    """For each random crop `method` takes: output side / mean side of the region it is cut
    from (a crop of area fraction s of an image of side `side` covers side x sqrt(s))."""
    c = data.crops

    def factor(size: int, scale: tuple[float, float]) -> float:
        return size / (side * ((scale[0] + scale[1]) / 2) ** 0.5)

    if method == "dino":
        out = {"global_size": factor(c.global_size, c.global_scale)}
        if c.local_number:
            out["local_size"] = factor(c.local_size, c.local_scale)
        return out
    return {"mae_size": factor(c.mae_size, c.mae_scale)}


def warn_if_upsampling(data: DataConfig, method: str) -> None:
    """Warn (once per shard set and process) when a crop enlarges the stored images by more
    than `UPSAMPLE_WARN` on average: a crop size meant for ImageNet on small images costs
    time and memory for no information (MAE at 224 on 32-pixel digits: 42 s a step)."""
    if data.buckets.navit or data.train.shards in _warned_upsample:
        return
    side = stored_side(data.train.shards)
    if side is None:
        return
    _warned_upsample.add(data.train.shards)
    for key, f in upsampling(data, method, side).items():
        if f > UPSAMPLE_WARN:
            log.warning(
                "data.crops.%s=%d enlarges the images of %s (about %.0f pixels a side) %.1fx on "
                "average: lower it to about the stored size",
                key, getattr(data.crops, key), data.train.shards, side, f,
            )  # fmt: skip


def build_train_loader(
    data: DataConfig,
    *,
    method: str,
    stride: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_prefix_tokens: int = 1,
    agree: Callable[[bool], bool] | None = None,
) -> ShardLoader:
    """The pretraining loader for `method` ("dino" | "mae") on a backbone of input `stride`.

    With NaViT packing, `batch_size` counts packed sequences of one view, not images, and the
    views are one `PackedBatch` per view. With crops on the device (`crops_on_device`), batches
    hold a `CropBatch` for `device_crops.cut_views`.
    """
    if rank == 0:
        warn_if_upsampling(data, method)
    on_device = crops_on_device(data)
    transform: Callable[..., Any]
    maker = DinoCrops if method == "dino" else MaeCrop
    transform = maker(data.crops, on_device=on_device)
    collate: Callable[[list[Any]], Any] = collate_decoded if on_device else collate_views
    grouper = None
    if data.buckets.navit:
        # MAE: the whole image (its token dropout is the augmentation); DINO: its multicrop.
        if method != "dino":
            transform = ResizeTo(data.crops.hflip)
        grouper = NaViTGrouper(data, method, stride, batch_size, num_prefix_tokens)
        collate = PackCollate(stride, data.buckets.seq_len, num_prefix_tokens)
    elif data.buckets.enabled:
        grouper = BucketGrouper(data, method, stride, batch_size)
    return ShardLoader(
        data.train.shards,
        transform=transform,
        collate=collate,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        workers=data.workers,
        mode=data.mode,
        shuffle_buffer=data.shuffle_buffer,
        max_bad_fraction=data.max_bad_fraction,
        grouper=grouper,
        agree=agree,
        **_device_kwargs(on_device),
    )


def build_eval_loader(
    data: DataConfig,
    shards: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int = 0,
    on_device: bool = False,
) -> ShardLoader:
    """Evaluation: every sample once, in a fixed order, resized and centre-cropped (on_device:
    batches hold a `CropBatch` for `device_crops.cut_views`)."""
    return ShardLoader(
        shards,
        transform=EvalCrop(
            data.eval_resize,
            data.eval_crop,
            on_device=on_device,
            max_side=data.crops.device_max_side,
        ),
        collate=collate_decoded if on_device else collate_views,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        workers=data.workers,
        mode="exact",
        shuffle_buffer=0,
        max_bad_fraction=data.max_bad_fraction,
        **_device_kwargs(on_device),
    )

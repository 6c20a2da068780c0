"""Crops cut on the training device (`data.crops.on_device`): the workers decode, the device cuts.

Worker side: a view maker built with `on_device=True` (transforms.py) decodes the image (JPEG
`draft` when every box allows it, an optional cap on the longest side) and samples every view's
box and flip from the same seeded generator as the CPU path; it returns a `Decoded` (the RGBX
pixels and the boxes in their coordinates). `collate_decoded` packs a batch of them into a
`CropBatch`: one (B, H, W, 4) uint8 block padded to the batch's largest image, in shared memory
when it is built in a loader worker, so nothing is copied again on its way to the trainer.

Device side: `cut_views` cuts and resizes all views of a `CropBatch`, per output size one gather
of every view's box window and two batched matrix products, and flips them. The resize is the
one the CPU path runs (torch's antialiased bilinear, a port of Pillow's): a triangle filter
widened by the scale when it shrinks, cut at the box's edges and normalised, applied separably
(rows, then columns) as per-view banded matrices. The CPU path rounds to uint8 between its two
passes and this one only at the end (fp16 operands on a GPU), so the two agree to a grey level
or so, not bitwise. The output is uint8 (B, 3, h, w) per view, what `DeviceAugment`
and `normalize` take. `to_device` and `DevicePrefetch` move batches (pinned, non-blocking, on a
side CUDA stream one batch ahead).

Not here: box sampling and decoding (transforms.py), which batch a sample joins (stream.py,
buckets.py), colour augmentation (transforms.DeviceAugment).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = [
    "CropBatch",
    "Decoded",
    "DevicePrefetch",
    "collate_decoded",
    "cut_views",
    "device_views",
    "to_device",
]


class Decoded(NamedTuple):
    """One image as a worker ships it: the decoded pixels and what to cut out of them.

    pixels: (H, W, 4) uint8 RGBX; boxes: per view (x0, y0, x1, y1) in pixel coordinates of
    `pixels`, end exclusive; flips: per view; out_hw: per view, the output (h, w)."""

    pixels: np.ndarray
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]
    out_hw: list[tuple[int, int]]


@dataclass(frozen=True)
class CropBatch:
    """The images of one batch and the views to cut from them.

    images: (B, H, W, 4) uint8 RGBX, each image at the top left, the rest padding (zeros);
    sizes: (B, 2) int32 (height, width) of each image; boxes: (B, V, 4) int32 (x0, y0, x1, y1);
    flips: (B, V) bool; out_hw: per view, the output (h, w) (one per batch: a bucketed batch
    shares its bucket's shapes). `ready` is set on a batch copied on a side CUDA stream.
    """

    images: torch.Tensor
    sizes: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    out_hw: tuple[tuple[int, int], ...]
    ready: Any = None  # torch.cuda.Event recorded after the copy, or None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def nbytes(self) -> int:
        """Bytes moved to the device for this batch (pixels with padding, boxes, flips)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def pixel_bytes(self) -> int:
        """Bytes of the images themselves (RGBX), without the batch's padding."""
        return int(self.sizes.prod(dim=1).sum()) * 4

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.sizes, self.boxes, self.flips

    def pin_memory(self, device: Any = None) -> CropBatch:
        """Page-locked copy (what DataLoader's pin_memory thread calls), so the host-to-device
        copy can run asynchronously."""
        return replace(self, **{k: getattr(self, k).pin_memory() for k in _TENSOR_FIELDS})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropBatch:
        """The batch on `device` (non_blocking from pinned memory overlaps the copy)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in _TENSOR_FIELDS}
        return replace(self, **moved, ready=None)


_TENSOR_FIELDS = ("images", "sizes", "boxes", "flips")


def _shared_uint8(numel: int) -> torch.Tensor:
    """An uninitialised uint8 tensor, in shared memory inside a loader worker: the batch then
    travels to the main process as a handle, not through a copy into shared memory on pickling
    (what torch's default_collate does too)."""
    if get_worker_info() is None:
        return torch.empty(numel, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(numel)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (numel,), (1,))


def collate_decoded(samples: list[Decoded]) -> CropBatch:
    """Pack the decoded images of one batch into a `CropBatch` (one copy of each image)."""
    if not samples:
        raise ValueError("collate_decoded needs at least one sample")
    out_hw = tuple(tuple(hw) for hw in samples[0].out_hw)
    if any(tuple(tuple(hw) for hw in s.out_hw) != out_hw for s in samples):
        raise ValueError("every sample of a batch must ask for the same view shapes")
    height = max(s.pixels.shape[0] for s in samples)
    width = max(s.pixels.shape[1] for s in samples)
    images = _shared_uint8(len(samples) * height * width * 4).view(len(samples), height, width, 4)
    # Whole 32-bit pixels: one element per pixel for the copies below.
    block = images.numpy().view(np.int32)[..., 0]
    for i, s in enumerate(samples):
        h, w = s.pixels.shape[:2]
        np.copyto(block[i, :h, :w], s.pixels.view(np.int32)[..., 0])
        block[i, :h, w:] = 0  # padding: never sampled with weight, zeroed to stay deterministic
        block[i, h:] = 0
    sizes = torch.tensor([s.pixels.shape[:2] for s in samples], dtype=torch.int32)
    boxes = torch.tensor([s.boxes for s in samples], dtype=torch.int32).view(len(samples), -1, 4)
    flips = torch.tensor([s.flips for s in samples], dtype=torch.bool).view(len(samples), -1)
    return CropBatch(images, sizes, boxes, flips, out_hw)


# ------------------------------------------------------------------------------------------------
# Cutting on the device
# ------------------------------------------------------------------------------------------------


def _taps(
    start: torch.Tensor, length: torch.Tensor, out: int, limit: int, flip: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view filter taps along one axis: indices (N, out, K) into the image (clamped to
    [0, limit)) and weights (N, out, K), zero past a box's edge.

    The weights are those of torch's antialiased bilinear resize of the box [start, start +
    length) to `out` pixels (`_compute_weights_aa` in UpSampleKernel.cpp): scale = length / out,
    support = max(scale, 1), output pixel i centred at scale * (i + 0.5) in the box, triangle of
    half-width `support`, cut at the box's edges and normalised. A flip reverses the outputs.
    """
    length = length.to(torch.float64)
    scale = length / out  # (N,)
    support = scale.clamp(min=1.0)
    taps = math.ceil(2 * float(support.max())) + 1 if len(scale) else 1
    centre = scale[:, None] * (torch.arange(out, device=start.device, dtype=torch.float64) + 0.5)
    first = (centre - support[:, None] + 0.5).floor().clamp(min=0)  # (N, out)
    end = torch.minimum((centre + support[:, None] + 0.5).floor(), length[:, None])
    j = first[..., None] + torch.arange(taps, device=start.device, dtype=torch.float64)
    weight = (1 - ((j - centre[..., None] + 0.5) / support[:, None, None]).abs()).clamp(min=0)
    weight = torch.where(j < end[..., None], weight, 0.0)
    weight = weight / weight.sum(-1, keepdim=True)
    index = (j.to(torch.int64) + start[:, None, None].to(torch.int64)).clamp(max=limit - 1)
    if flip is not None:
        flip = flip[:, None, None]
        index = torch.where(flip, index.flip(1), index)
        weight = torch.where(flip, weight.flip(1), weight)
    return index, weight.to(torch.float32)


def _band(
    index: torch.Tensor, weight: torch.Tensor, start: torch.Tensor, size: int
) -> torch.Tensor:
    """Taps (N, out, K) as dense (N, out, size) matrices over a window starting at `start` (N,).
    Padding taps carry weight 0, so where they land does not matter."""
    local = (index - start[:, None, None]).clamp(0, size - 1)
    dense = torch.zeros((*index.shape[:2], size), dtype=weight.dtype, device=weight.device)
    return dense.scatter_add_(2, local, weight)


def _cut_group(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """Views of one output size: (B, G, 4) boxes and (B, G) flips -> uint8 (G, B, h, w, 4).

    Each view's box window (as large as the group's largest box) is gathered once, then both
    passes are batched matrix products with the filter as a banded matrix: dense work, but on a
    GPU it runs on the tensor cores and reads each pixel once, where per-tap gathers would make
    a pass over the window per tap."""
    bsz, views = boxes.shape[:2]
    h, w = out_hw
    device = images.device
    # fp16 holds every uint8 level exactly and the products accumulate in fp32 on a GPU; the
    # CPU has no fast fp16 product.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    boxes = boxes.transpose(0, 1).reshape(-1, 4).to(torch.int64)  # view-major: (G * B, 4)
    flips = flips.transpose(0, 1).reshape(-1)
    n = len(boxes)
    image = torch.arange(bsz, device=device).repeat(views)  # which image each view is cut from
    x0, y0, x1, y1 = boxes.unbind(1)
    span_h, span_w = int((y1 - y0).max()), int((x1 - x0).max())
    rows = (y0[:, None] + torch.arange(span_h, device=device)).clamp(max=images.shape[1] - 1)
    cols = (x0[:, None] + torch.arange(span_w, device=device)).clamp(max=images.shape[2] - 1)
    pixels = images.view(torch.int32)[..., 0]  # whole 32-bit RGBX pixels: (B, H, W)
    window = pixels[image[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, Hs, Ws)
    window = window.view(torch.uint8).view(n, span_h, span_w * 4).to(dtype)
    index, weight = _taps(y0, y1 - y0, h, images.shape[1], None)
    vertical = _band(index, weight.to(dtype), y0, span_h)  # (N, h, Hs)
    index, weight = _taps(x0, x1 - x0, w, images.shape[2], flips)
    horizontal = _band(index, weight.to(dtype), x0, span_w).transpose(1, 2)  # (N, Ws, w)
    mid = torch.bmm(vertical, window).view(n, h, span_w, 4)  # (N, h, Ws * 4) -> (N, h, Ws, 4)
    mid = mid.permute(0, 1, 3, 2).reshape(n, h * 4, span_w)  # 'n h w c -> n (h c) w'
    out = torch.bmm(mid, horizontal).view(n, h, 4, w).permute(0, 1, 3, 2)  # (N, h, w, 4)
    out = out.float().round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(views, bsz, h, w, 4)


def cut_views(batch: CropBatch) -> list[torch.Tensor]:
    """Cut, resize and flip every view of `batch` on its device: a list of uint8 (B, 3, h, w)
    tensors (channels-last memory), view i of every image in tensor i."""
    views: list[torch.Tensor | None] = [None] * len(batch.out_hw)
    # One pass per output size: DINO's 2 global views, then its local views, ...
    for hw in dict.fromkeys(batch.out_hw):
        group = [i for i, shape in enumerate(batch.out_hw) if shape == hw]
        index = torch.tensor(group, device=batch.boxes.device)
        cut = _cut_group(batch.images, batch.boxes[:, index], batch.flips[:, index], hw)
        for g, i in enumerate(group):
            views[i] = cut[g, ..., :3].permute(0, 3, 1, 2)  # (B, h, w, 4) -> (B, 3, h, w)
    return views


def device_views(views: CropBatch | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views as uint8 (B, C, h, w) tensors: a `CropBatch` is cut where it is; views cut on the
    CPU (a list of tensors) are returned as they are."""
    if isinstance(views, CropBatch):
        return cut_views(views)
    return list(views)


def to_device(
    views: CropBatch | Sequence[torch.Tensor], device: torch.device
) -> CropBatch | list[torch.Tensor]:
    """A batch's views on `device` (non-blocking). A `CropBatch` already copied there by
    `DevicePrefetch` is only waited for: the current stream waits for its copy's event."""
    if isinstance(views, CropBatch):
        if views.ready is not None and views.device == device:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(views.ready)
            for t in views._tensors():  # made on the side stream, now used on this one
                t.record_stream(stream)
            return replace(views, ready=None)
        return views.to(device, non_blocking=True)
    return [v.to(device, non_blocking=True) for v in views]


class DevicePrefetch:
    """Copies a batch's `CropBatch` to a CUDA device on a side stream, non-blocking, so that the
    copy of the next batch overlaps the current step (the loader calls it one batch ahead)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: dict) -> dict:
        views = batch.get("views")
        if not isinstance(views, CropBatch) or self.stream is None:
            return batch
        with torch.cuda.stream(self.stream):
            moved = views.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return {**batch, "views": replace(moved, ready=ready)}

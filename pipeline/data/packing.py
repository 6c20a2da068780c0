"""NaViT sequence packing: images of different sizes, patchified and packed into fixed-length rows.

This module only lays tokens out; the ViT's `forward_packed` turns a `PackedBatch` into features
with block-diagonal attention. It sits in `data` so the loader can pack without importing models.
It holds no weights and makes no packing-policy decision beyond first-fit in the given order.
Besides `pack_images`, the helpers the objectives need on packed batches: `map_images` (a per-image
transform, run per shape), `select_tokens` (MAE's token dropout) and `cat_packed` (several packed
views as one forward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange


class PackedBatch(NamedTuple):
    """Images packed into B rows of L slots.

    patches:   (B, L, C*p*p) float, each patch flattened in (c, p, q) order; zeros elsewhere.
    coords:    (B, L, 2) long, (row, col) of the patch in its image's grid; -1 for prefix/padding.
    image_ids: (B, L) long, index of the image within its row; -1 for padding.
    grids:     (B, M, 2) long, patch grid (rows, cols) of each image in a row; 0 where unused.
    order:     (B, M) long, position of each image in the caller's list; -1 where unused.
    """

    patches: torch.Tensor
    coords: torch.Tensor
    image_ids: torch.Tensor
    grids: torch.Tensor
    order: torch.Tensor

    @property
    def num_images(self) -> int:
        """Number of real images in the batch."""
        return int((self.grids[..., 0] > 0).sum())

    def to(
        self, target: torch.device | str | torch.dtype, non_blocking: bool = False
    ) -> PackedBatch:
        """Every tensor moved to a device, or the patches cast to a dtype (the layout tensors stay
        long): what `Tensor.to` does for a batch of views, so the loop treats both alike."""
        if isinstance(target, torch.dtype):
            return self._replace(patches=self.patches.to(target))
        return PackedBatch(*(t.to(target, non_blocking=non_blocking) for t in self))

    def float(self) -> PackedBatch:
        """The patches as float32."""
        return self.to(torch.float32)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) image -> (N, C*p*p) patches, row-major over the grid."""
    return rearrange(image, "c (h p) (w q) -> (h w) (c p q)", p=patch_size, q=patch_size)


def pack_images(
    images: Sequence[torch.Tensor],
    patch_size: int,
    max_len: int,
    num_prefix_tokens: int = 0,
) -> PackedBatch:
    """Pack (C, H, W) images first-fit into rows of `max_len` slots.

    Each image takes `num_prefix_tokens` slots (its own class token, when the model has one) then
    its patches. First-fit may place a later image in an earlier row; `order` records where each
    came from, so `forward_packed` returns pooled features in the order of `images`.
    """
    rows: list[list[int]] = []
    used: list[int] = []
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        if h % patch_size or w % patch_size:
            raise ValueError(f"image {i}: {h}x{w} is not divisible by the patch size {patch_size}")
        need = num_prefix_tokens + (h // patch_size) * (w // patch_size)
        if need > max_len:
            raise ValueError(f"image {i}: {need} tokens do not fit in a row of {max_len}")
        for r, n in enumerate(used):
            if n + need <= max_len:
                rows[r].append(i)
                used[r] += need
                break
        else:
            rows.append([i])
            used.append(need)

    c = images[0].shape[0]
    b, m = len(rows), max(len(r) for r in rows)
    patches = torch.zeros(b, max_len, c * patch_size**2, dtype=images[0].dtype)
    coords = torch.full((b, max_len, 2), -1, dtype=torch.long)
    image_ids = torch.full((b, max_len), -1, dtype=torch.long)
    grids = torch.zeros(b, m, 2, dtype=torch.long)
    order = torch.full((b, m), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for slot, i in enumerate(members):
            gh, gw = (s // patch_size for s in images[i].shape[-2:])
            n = gh * gw
            image_ids[r, pos : pos + num_prefix_tokens + n] = slot
            pos += num_prefix_tokens
            patches[r, pos : pos + n] = patchify(images[i], patch_size)
            rr, cc = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            coords[r, pos : pos + n] = torch.stack([rr.flatten(), cc.flatten()], dim=-1)
            grids[r, slot] = torch.tensor([gh, gw])
            order[r, slot] = i
            pos += n
    return PackedBatch(patches, coords, image_ids, grids, order)


def token_grids(batch: PackedBatch) -> torch.Tensor:
    """(B, L, 2) patch grid (rows, cols) of the image each slot belongs to; a padding slot gets
    its row's first image's grid, so mask it with `coords >= 0` or `image_ids >= 0`."""
    return torch.gather(
        batch.grids, 1, batch.image_ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, 2)
    )


def distinct_grids(batch: PackedBatch) -> list[tuple[int, int]]:
    """The distinct (rows, cols) patch grids of the batch's images."""
    grids = batch.grids
    return [tuple(g) for g in torch.unique(grids[grids[..., 0] > 0], dim=0).tolist()]


def map_images(
    batch: PackedBatch, patch_size: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> PackedBatch:
    """`batch` with `fn` applied to its images: fn gets the images of one shape at a time as an
    (n, C, H, W) batch (in row, then slot order) and returns (n, C', H, W) of any dtype.

    Per-image work that needs the image, not its tokens (colour augmentation, whose blur is
    spatial; normalisation), runs vectorised this way. Prefix and padding slots are zero after.
    """
    patches, coords = batch.patches, batch.coords
    grid_of_token = token_grids(batch)
    is_patch = coords[..., 0] >= 0
    out = None
    for rows, cols in distinct_grids(batch):
        sel = is_patch & (grid_of_token == grid_of_token.new_tensor([rows, cols])).all(-1)
        # Each image's patches are contiguous and row-major, images in (row, slot) order.
        images = rearrange(patches[sel], "(n h w) (c p q) -> n c (h p) (w q)",
                           h=rows, w=cols, p=patch_size, q=patch_size)  # fmt: skip
        mapped = rearrange(fn(images), "n c (h p) (w q) -> (n h w) (c p q)",
                           p=patch_size, q=patch_size)  # fmt: skip
        if out is None:
            out = mapped.new_zeros(*patches.shape[:2], mapped.shape[-1])
        out[sel] = mapped
    return batch._replace(patches=patches.new_zeros(patches.shape) if out is None else out)


def select_tokens(batch: PackedBatch, keep: torch.Tensor) -> PackedBatch:
    """The slots where `keep` (B, L) is True, moved to the front of their row in their order
    (slot l goes to `keep[:, :l].sum()`), rows cut to the longest, padding after.

    Images keep their grids, and each kept patch its coordinates, so the position embeddings
    and attention groups of the kept tokens are what they were (MAE's token dropout).
    """
    b = keep.shape[0]
    counts = keep.sum(dim=1)
    length = int(counts.max()) if b else 0
    # A stable sort of "dropped" flags puts the kept slots first, in their order.
    index = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :length]
    valid = torch.arange(length, device=keep.device) < counts.unsqueeze(1)  # (B, L')

    def take(t: torch.Tensor, fill: int) -> torch.Tensor:
        shape = (b, length) + (1,) * (t.ndim - 2)
        got = torch.gather(t, 1, index.view(shape).expand(b, length, *t.shape[2:]))
        return torch.where(valid.view(shape), got, fill)

    return PackedBatch(take(batch.patches, 0), take(batch.coords, -1),
                       take(batch.image_ids, -1), batch.grids, batch.order)  # fmt: skip


def cat_packed(batches: Sequence[PackedBatch]) -> PackedBatch:
    """The rows of several batches (one row length) as one batch, images numbered on: the images
    of `batches[k]` come after those of every earlier batch in `order`, so one `forward_packed`
    returns the pooled features of every batch, one batch after the other."""
    slots = max(x.grids.shape[1] for x in batches)
    parts, offset = [], 0
    for x in batches:
        pad = slots - x.grids.shape[1]
        order = F.pad(x.order, (0, pad), value=-1)
        parts.append((x.patches, x.coords, x.image_ids, F.pad(x.grids, (0, 0, 0, pad)),
                      torch.where(order >= 0, order + offset, order)))  # fmt: skip
        offset += x.num_images
    return PackedBatch(*(torch.cat(t) for t in zip(*parts, strict=True)))

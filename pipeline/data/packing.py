"""NaViT sequence packing: images of different sizes, patchified and packed into fixed-length rows.

This module only lays tokens out; the ViT's `forward_packed` turns a `PackedBatch` into features
with block-diagonal attention. It sits in `data` so the loader can pack without importing models.
It holds no weights and makes no packing-policy decision beyond first-fit in the given order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
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

    def to(self, device: torch.device | str) -> PackedBatch:
        """Move every tensor to `device`."""
        return PackedBatch(*(t.to(device) for t in self))


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

"""NaViT pretraining: MAE and DINO on packed batches of mixed-size images give every image the loss
it gets unpacked, alone (fixed masks and crops, tiny ViTs), and the packed-batch helpers."""

from __future__ import annotations

import pytest
import torch
from test_dino import teacher_outputs, tiny_dino
from test_mae import make_mae, smooth_images

from pipeline.data.buckets import Bucket, local_shape
from pipeline.data.packing import cat_packed, map_images, pack_images, select_tokens
from pipeline.methods.dino import make_teacher
from pipeline.methods.mae import MaskSample

# (h, w) in pixels, patch 8: several rows of 40 slots, padding, and several images per row.
SIZES = [(32, 32), (16, 48), (24, 16), (40, 32), (16, 16), (8, 56), (48, 24)]
TOL = dict(atol=1e-5, rtol=0)


def images(sizes=SIZES, seed: int = 0) -> list[torch.Tensor]:
    return [smooth_images(1, h, w, seed=seed + i)[0] for i, (h, w) in enumerate(sizes)]


def place(batch, i: int) -> tuple[int, torch.Tensor]:
    """Row of image i of the caller's list and the mask of its patch slots (raster order)."""
    row, slot = (batch.order == i).nonzero()[0].tolist()
    return row, (batch.image_ids[row] == slot) & (batch.coords[row, :, 0] >= 0)


def mask_sample(hidden: torch.Tensor) -> MaskSample:
    """The MaskSample of one image from its (N,) hidden flags, visible patches first."""
    order = torch.cat([(~hidden).nonzero()[:, 0], hidden.nonzero()[:, 0]])
    return MaskSample(hidden[None], order[None, : int((~hidden).sum())], order.argsort()[None])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_packed_per_image_loss_equals_each_image_alone(norm_pix):
    mae = make_mae("vit", mask_ratio=0.75, norm_pix_loss=norm_pix).eval()
    imgs = images()
    batch = pack_images(imgs, 8, max_len=40, num_prefix_tokens=1)
    assert batch.patches.shape[0] >= 3 and (batch.image_ids == -1).any()
    hidden = mae.packed_masking(batch, torch.Generator().manual_seed(0))
    out = mae.forward_packed(batch, hidden=hidden)
    for i, img in enumerate(imgs):
        row, slots = place(batch, i)
        mask = hidden[row, slots]
        n = mask.numel()
        assert int(mask.sum()) == min(max(round(0.75 * n), 1), n - 1), f"image {i}"
        rows, cols = img.shape[1] // 8, img.shape[2] // 8
        masks = mask_sample(mask)
        pred = mae.forward_decoder(mae.forward_encoder(img[None], masks), masks, (rows, cols))
        weights = mae.loss_weights(masks.mask, rows, cols)
        alone = mae.loss(pred, mae.target(img[None]), weights)
        torch.testing.assert_close(out["per_image"][i], alone, **TOL)
        torch.testing.assert_close(out["pred"][row, slots], pred[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], out["per_image"].mean(), **TOL)


def test_mae_packed_masks_vary_and_train():
    mae = make_mae("vit", mask_ratio=0.5)
    batch = pack_images(images(), 8, max_len=40, num_prefix_tokens=1)
    gen = torch.Generator().manual_seed(0)
    first, second = (mae.packed_masking(batch, gen) for _ in range(2))
    assert not torch.equal(first, second)
    out = mae(batch, gen)  # a PackedBatch goes to forward_packed
    out["loss"].backward()
    enc = [n for n, p in mae.backbone.named_parameters() if p.grad is None and "attn_pool" not in n]
    assert not enc and mae.decoder.mask_token.grad.abs().sum() > 0


def test_dino_packed_per_image_loss_equals_each_image_alone():
    student = tiny_dino(seed=0)
    student.criterion.center.normal_(generator=torch.Generator().manual_seed(1))
    teacher = make_teacher(student)
    sizes = SIZES[:5]
    views = []  # view v of every image: two globals at the image's shape, two smaller locals
    for v in range(4):
        shapes = sizes if v < 2 else [local_shape(Bucket(*hw), 32, 16, 8) for hw in sizes]
        views.append(images(shapes, seed=10 * v))
    packed = [pack_images(view, 8, max_len=40, num_prefix_tokens=1) for view in views]
    assert packed[0].patches.shape[0] >= 2
    t_packed = teacher_outputs(teacher, packed[:2])
    s_packed = student.embed(packed)
    loss = student(packed, t_packed, 0.04)["loss"]
    alone_losses = []
    for i in range(len(sizes)):
        own = [view[i][None] for view in views]
        t_alone = teacher_outputs(teacher, own[:2])
        for a, b in zip(t_packed, t_alone, strict=True):
            torch.testing.assert_close(a[i : i + 1], b, **TOL)
        alone = student(own, t_alone, 0.04)["loss"]
        # This image's loss inside the packed batch: its rows of the packed outputs.
        mine = student.criterion(
            [s[i : i + 1] for s in s_packed], [t[i : i + 1] for t in t_packed], 0.04
        )["loss"]
        torch.testing.assert_close(mine, alone, **TOL)
        alone_losses.append(alone)
    torch.testing.assert_close(loss, torch.stack(alone_losses).mean(), **TOL)


def test_packed_helpers_keep_each_image_intact():
    imgs = images()
    batch = pack_images(imgs, 8, max_len=40, num_prefix_tokens=1)
    # map_images hands each image whole to fn (grouped by shape).
    doubled = map_images(batch, 8, lambda x: 2 * x + x.mean(dim=(1, 2, 3), keepdim=True))
    again = pack_images([2 * x + x.mean() for x in imgs], 8, max_len=40, num_prefix_tokens=1)
    torch.testing.assert_close(doubled.patches, again.patches)
    # select_tokens keeps slots in order and the layout of what it keeps.
    keep = batch.image_ids >= 0
    keep[:, 3] = False
    small = select_tokens(batch, keep)
    for r in range(keep.shape[0]):
        n = int(keep[r].sum())
        assert torch.equal(small.image_ids[r, :n], batch.image_ids[r][keep[r]])
        assert torch.equal(small.coords[r, :n], batch.coords[r][keep[r]])
        assert (small.image_ids[r, n:] == -1).all()
    # cat_packed numbers the second batch's images after the first's.
    both = cat_packed([batch, pack_images(imgs[:2], 8, max_len=40)])
    assert both.num_images == len(imgs) + 2
    assert sorted(both.order[both.order >= 0].tolist()) == list(range(len(imgs) + 2))

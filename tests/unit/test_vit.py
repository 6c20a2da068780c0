"""ViT specifics: position-embedding resize, keep-index forward, NaViT packing, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.packing import pack_images
from pipeline.models.vit import VisionTransformer, build_vit


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)
    args.update(kw)
    return VisionTransformer(**args)


def test_pos_embed_resize_equals_bicubic_interpolate_and_is_cached():
    m = tiny_vit()
    g = m.base_grid
    table = m.pos_embed[0, 1:].reshape(g, g, -1).permute(2, 0, 1)[None]
    for rows, cols in [(3, 7), (9, 2), (6, 6)]:
        ref = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
        ref = ref[0].permute(1, 2, 0).reshape(rows * cols, -1)
        torch.testing.assert_close(m.patch_pos_embed(rows, cols), ref, atol=1e-6, rtol=1e-5)
    before = m._pos_resize_matrices(3, 7, torch.device("cpu"))
    assert m._pos_resize_matrices(3, 7, torch.device("cpu")) is before
    assert m.patch_pos_embed(g, g) is not None and len(m._resize_cache) == 3


def test_pos_embed_gets_gradient_at_every_grid():
    m = tiny_vit()
    for h, w in [(32, 32), (24, 48)]:
        m.zero_grad()
        m(torch.randn(2, 3, h, w)).sum().backward()
        assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0


def _reference_forward(m: VisionTransformer, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept tokens run alone, embedded with plain conv + interpolate (no shared helpers)."""
    p = m.patch_size
    rows, cols = x.shape[-2] // p, x.shape[-1] // p
    tok = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p)
    g = m.base_grid
    table = m.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
    tok = (tok + pos).flatten(2).transpose(1, 2)  # (B, N, D)
    out = []
    for b in range(x.shape[0]):
        seq = torch.cat([m.cls_token[0] + m.pos_embed[0, :1], tok[b, keep[b]]])[None]
        for blk in m.blocks:
            seq = blk(seq)
        out.append(m.norm(seq)[0])
    return torch.stack(out)


def test_keep_index_forward_equals_kept_tokens_alone():
    m = tiny_vit().eval()
    x = torch.randn(3, 3, 24, 40)  # 3 x 5 grid, not the base grid
    gen = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(15, generator=gen)[:4] for _ in range(3)])
    torch.testing.assert_close(
        m.forward_features(x, keep=keep), _reference_forward(m, x, keep), atol=1e-5, rtol=1e-5
    )


def test_keep_all_in_any_order_permutes_the_full_forward():
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    full = m.forward_features(x)
    perm = torch.randperm(16).expand(2, -1)
    out = m.forward_features(x, keep=perm)
    torch.testing.assert_close(out[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1:], full[:, 1:][:, perm[0]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pool,class_token", [("cls", True), ("mean", True), ("mean", False), ("map", False)]
)
def test_navit_packed_equals_each_image_alone(pool, class_token):
    m = tiny_vit(pool=pool, class_token=class_token).eval()
    sizes = [(32, 32), (16, 48), (24, 8), (40, 40), (8, 8), (56, 16)]
    gen = torch.Generator().manual_seed(2)
    images = [torch.randn(3, h, w, generator=gen) for h, w in sizes]
    batch = pack_images(images, patch_size=8, max_len=40, num_prefix_tokens=m.num_prefix_tokens)
    assert batch.patches.shape[0] >= 2, "the test must pack several rows"
    assert (batch.image_ids == -1).any(), "the test must include padding"
    tokens, pooled = m.forward_packed(batch)
    assert pooled.shape == (len(images), 32)
    for i, img in enumerate(images):
        alone_tokens = m.forward_features(img[None])[0]
        torch.testing.assert_close(pooled[i], m.pool(alone_tokens[None])[0], atol=1e-5, rtol=0)
        row, slot = (batch.order == i).nonzero()[0].tolist()
        torch.testing.assert_close(
            tokens[row][batch.image_ids[row] == slot], alone_tokens, atol=1e-5, rtol=0
        )


def test_navit_backward_reaches_every_parameter():
    m = tiny_vit(pool="map", class_token=False)
    images = [torch.randn(3, 16, 24), torch.randn(3, 32, 8)]
    _, pooled = m.forward_packed(pack_images(images, 8, 16))
    pooled.sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_pack_images_rejects_bad_inputs():
    with pytest.raises(ValueError, match="image 0: 20x16 is not divisible"):
        pack_images([torch.randn(3, 20, 16)], 8, 64)
    with pytest.raises(ValueError, match="image 1: 65 tokens do not fit"):
        pack_images([torch.randn(3, 8, 8), torch.randn(3, 64, 64)], 8, 64, num_prefix_tokens=1)


def test_sizes_patches_and_options():
    for patch in (8, 14, 16):
        m = build_vit("tiny", patch, depth=1, num_classes=5)
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    ls = tiny_vit(layer_scale_init=1e-5)
    assert "blocks.0.ls1.gamma" in dict(ls.named_parameters())
    with pytest.raises(ValueError, match="unknown ViT size 'giant'"):
        build_vit("giant", 16)
    with pytest.raises(ValueError, match="must have sides divisible by 8"):
        tiny_vit()(torch.randn(1, 3, 30, 32))


def test_drop_path_is_random_in_training_only():
    m = tiny_vit(drop_path_rate=0.5, depth=4)
    x = torch.randn(8, 3, 32, 32)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_grad_checkpointing_matches_plain_backward():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        m = tiny_vit(grad_checkpointing=ckpt)
        m(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_no_weight_decay_names():
    names = tiny_vit().no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= names
    assert "blocks.0.attn.qkv.weight" not in names

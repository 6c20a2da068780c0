"""Every backbone family against the shared contract: sizes, resolutions, dtypes, gradients."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import BACKBONE_NAMES, input_stride
from pipeline.models import BACKBONES, Backbone, build_backbone

PUBLISHED_M = {
    "vit_small_patch16": 22.1,
    "vit_base_patch16": 86.6,
    "vit_large_patch16": 304.3,
    "swin_tiny": 28.3,
    "swin_small": 49.6,
    "swin_base": 87.8,
    "twins_svt_small": 24.1,
    "twins_svt_base": 56.1,
    "twins_svt_large": 99.3,
}

# One tiny configuration per family: same code paths, a fraction of the cost.
TINY = {
    "vit_tiny_patch16": dict(embed_dim=32, depth=2, num_heads=2),
    "swin_tiny": dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)),
    "twins_svt_small": dict(dims=(16, 32, 32, 64), depths=(2, 1, 2, 1), heads=(1, 2, 2, 4)),
}
RESOLUTIONS = [(224, 224), (256, 192), (160, 288), (96, 96)]


@pytest.mark.parametrize("name", PUBLISHED_M)
def test_parameter_count_matches_paper(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_backbone(name, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01, f"{name}: {count:.2f}M"


def test_registry_agrees_with_recipe_schema():
    assert set(BACKBONES) == set(BACKBONE_NAMES)
    for name in BACKBONES:
        with torch.device("meta"):
            model = build_backbone(name)
        assert isinstance(model, Backbone)
        assert input_stride(name) == model.patch_size, name


def test_unknown_backbone_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'swin_tiny'"):
        build_backbone("swin_tiy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", TINY)
def test_forward_backward_every_resolution(name, dtype):
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=10, **TINY[name]).to(dtype)
    for h, w in RESOLUTIONS:
        x = torch.randn(2, 3, h, w, dtype=dtype)
        feats = model.forward_features(x)
        pooled = model.pool(feats)
        logits = model.head(pooled)
        assert feats.dtype == dtype and logits.shape == (2, 10)
        assert pooled.shape == (2, model.embed_dim)
        if model.masking == "drop":  # ViT tokens: prefix + one per patch
            n = (h // model.patch_size) * (w // model.patch_size)
            assert feats.shape == (2, model.num_prefix_tokens + n, model.embed_dim)
        else:  # hierarchical map at the coarsest stride (ceil: stages pad odd sides)
            s = model.mask_stride
            assert feats.shape == (2, -(-h // s), -(-w // s), model.embed_dim)
        model.zero_grad()
        # The head starts at zero, so the pooled sum carries gradient into the backbone too.
        (logits.float().sum() + pooled.float().pow(2).sum()).backward()
        no_grad = [
            n
            for n, p in model.named_parameters()
            if "mask_token" not in n
            and (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum())
        ]
        assert not no_grad, f"{name} at {h}x{w}: no finite gradient for {no_grad}"

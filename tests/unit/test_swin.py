"""Swin backbone: sizes, any-resolution forward/backward, window locality, masks and their cache."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from pipeline.models.swin import (
    SWIN_SIZES,
    SwinTransformer,
    build_swin,
    relative_position_index,
    window_plan,
)

TINY = {"embed_dim": 24, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 3, 4)}
CPU = torch.device("cpu")


def tiny_swin(**overrides: object) -> SwinTransformer:
    torch.manual_seed(0)
    return build_swin("tiny", **{**TINY, **overrides})


def one_stage(window_size: int = 4) -> SwinTransformer:
    """One stage of two blocks (regular, shifted) in float64, for exact-zero gradient checks."""
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=8, depths=(2,), num_heads=(2,), window_size=window_size)
    return model.double()


@pytest.mark.parametrize(
    ("size", "published"), [("tiny", 28.3e6), ("small", 49.6e6), ("base", 87.8e6)]
)
def test_param_counts_match_paper(size: str, published: float) -> None:
    with torch.device("meta"):
        model = build_swin(size, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - published) / published < 0.01, n


def test_timm_parameter_names_and_contract() -> None:
    with torch.device("meta"):
        model = build_swin("tiny", num_classes=1000)
    keys = set(model.state_dict())
    for name in [
        "patch_embed.proj.weight",
        "patch_embed.norm.weight",
        "layers.1.downsample.norm.weight",
        "layers.1.downsample.reduction.weight",
        "layers.2.blocks.5.norm1.weight",
        "layers.2.blocks.5.attn.qkv.bias",
        "layers.2.blocks.5.attn.proj.weight",
        "layers.2.blocks.5.attn.relative_position_bias_table",
        "layers.2.blocks.5.norm2.bias",
        "layers.2.blocks.5.mlp.fc1.weight",
        "layers.2.blocks.5.mlp.fc2.bias",
        "norm.weight",
        "head.fc.weight",
        "head.fc.bias",
    ]:
        assert name in keys, name
    assert "layers.0.downsample.norm.weight" not in keys
    assert "layers.1.downsample.reduction.bias" not in keys
    assert not any("relative_position_index" in k for k in keys)
    table = model.state_dict()["layers.3.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (13 * 13, 24)
    assert (model.embed_dim, model.patch_size, model.mask_stride) == (768, 4, 32)
    assert model.masking == "token" and model.num_classes == 1000
    no_wd = model.no_weight_decay()
    assert "mask_token" in no_wd
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in no_wd
    assert "layers.0.blocks.0.attn.qkv.weight" not in no_wd


def test_unknown_size_and_bad_input() -> None:
    with pytest.raises(ValueError, match="tiny, small, base, large"):
        build_swin("huge")
    model = tiny_swin()
    with pytest.raises(ValueError, match="swin_tiny"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="mask shape"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 4, 4, dtype=torch.bool))
    assert set(SWIN_SIZES) == {"tiny", "small", "base", "large"}


def test_drop_path_rates_linear_over_all_blocks() -> None:
    model = tiny_swin(drop_path_rate=0.7)
    rates = [blk.drop_path1.drop_prob for stage in model.layers for blk in stage.blocks]
    assert rates == pytest.approx([0.1 * i for i in range(8)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(224, 224), (256, 192), (160, 288), (96, 96)])
def test_forward_backward_any_resolution(hw: tuple[int, int], dtype: torch.dtype) -> None:
    model = tiny_swin(num_classes=10).to(dtype)
    x = torch.randn(2, 3, *hw, dtype=dtype)
    feats = model.forward_features(x)
    expected = [2, *(math.ceil(s / 32) for s in hw), 192]
    assert list(feats.shape) == expected and feats.dtype == dtype
    assert model.pool(feats).shape == (2, 192)
    logits = model.head(model.pool(feats))
    assert logits.shape == (2, 10)
    # The head is zero-initialised, so the feature term is what carries gradient into the body.
    (logits.float().sum() + feats.float().square().mean()).backward()
    for name, p in model.named_parameters():
        if name == "mask_token":
            assert p.grad is None
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.layers[0].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_odd_maps_are_padded_by_merging() -> None:
    model = tiny_swin()
    feats = model.forward_features(torch.randn(1, 3, 100, 60))  # grids 25x15, 13x8, 7x4, 4x2
    assert feats.shape == (1, 4, 2, 192)
    assert torch.isfinite(feats).all()


def test_relative_position_index_matches_direct_computation() -> None:
    for wh, ww, w in [(7, 7, 7), (3, 7, 7), (4, 5, 7), (2, 2, 4)]:
        index = relative_position_index((wh, ww), w)
        pos = [(y, x) for y in range(wh) for x in range(ww)]
        for i, (yi, xi) in enumerate(pos):
            for j, (yj, xj) in enumerate(pos):
                dy, dx = yi - yj, xi - xj
                assert index[i, j] == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
        assert index.min() >= 0 and index.max() < (2 * w - 1) ** 2


def attended_keys(
    query: tuple[int, int], size: tuple[int, int], window: int, shifted: bool
) -> set[tuple[int, int]]:
    """Keys a query attends to, derived from the rolled-map construction with Python integers.

    Roll the padded map by -shift; keys must share the query's window in rolled coordinates and its
    region (the three slices of the Swin paper's cyclic-shift mask); padded positions never appear
    since only real positions are enumerated.
    """

    def place(i: int, side: int) -> tuple[int, int]:
        w = min(window, side)
        s = window // 2 if shifted and side > window else 0
        padded = math.ceil(side / w) * w
        rolled = (i - s) % padded
        region = 0 if s == 0 or rolled < padded - w else (1 if rolled < padded - s else 2)
        return rolled // w, region

    h, w = size
    qr, qc = place(query[0], h), place(query[1], w)
    return {(r, c) for r in range(h) for c in range(w) if place(r, h) == qr and place(c, w) == qc}


@pytest.mark.parametrize("shifted", [False, True])
# (11, 7) pads less than the shift, so wrapped real tokens share a rolled window with others.
@pytest.mark.parametrize("size", [(10, 9), (8, 8), (11, 7), (3, 10)])
def test_window_locality_by_gradients(size: tuple[int, int], shifted: bool) -> None:
    model = one_stage(window_size=4)
    stage = model.layers[0]
    block = stage.blocks[int(shifted)]
    assert block.shifted == shifted
    plans = stage.window_plans(*size, CPU)
    torch.manual_seed(1)
    x = torch.randn(1, *size, 8, dtype=torch.float64, requires_grad=True)
    out = block(x, plans)
    h, w = size
    for r in range(h):
        for c in range(w):
            (grad,) = torch.autograd.grad(out[0, r, c].sum(), x, retain_graph=True)
            touched = grad[0].abs().sum(-1) != 0  # (H, W)
            got = {(i, j) for i in range(h) for j in range(w) if touched[i, j]}
            assert got == attended_keys((r, c), size, 4, shifted), (r, c)


def test_shifted_window_example_from_corner() -> None:
    # 8x8 map, window 4, shift 2: the top-left token's shifted window wraps around to the far
    # corners after the roll, but only the 2x2 corner piece of its own region is attended.
    assert attended_keys((0, 0), (8, 8), 4, True) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert attended_keys((3, 3), (8, 8), 4, True) == {
        (r, c) for r in range(2, 6) for c in range(2, 6)
    }


def test_padding_is_masked_out() -> None:
    # 64x64 input: the stage-1 grid is 16x16, padded to 21x21 for 7x7 windows.
    model = tiny_swin(embed_dim=8, num_heads=(1, 1, 1, 1))
    feats = model.forward_features(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(feats).all()
    plan = model.layers[0].window_cache[(16, 16, CPU)][0]  # unshifted
    assert plan.window == (7, 7) and plan.padded == (21, 21) and plan.shift == (0, 0)
    valid = torch.zeros(21, 21, dtype=torch.bool)
    valid[:16, :16] = True
    valid = rearrange(valid, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=7, ww=7)  # (9, 49)
    mask = plan.mask  # (9, 49, 49)
    real_pair = valid[:, :, None] & valid[:, None, :]
    assert (mask[real_pair] == 0).all()  # unshifted: real tokens see every real token in window
    # Every query, real or padded, is blocked from padded keys (a padded query keeps only itself).
    padded_key = ~valid[:, None, :] & ~torch.eye(49, dtype=torch.bool)  # (9, 49, 49)
    assert padded_key.any()
    assert (mask[padded_key] == float("-inf")).all()


@pytest.mark.parametrize("size", [(9, 9), (14, 10), (3, 10)])
def test_every_mask_row_attends_somewhere(size: tuple[int, int]) -> None:
    # At 9x9 with window 4 and shift 2, the last shifted region is all padding: without a
    # fallback its queries would have no key, and a fully masked softmax row is NaN.
    for shifted in (False, True):
        plan = window_plan(size, 4, shifted, CPU)
        assert plan.mask is not None
        assert (plan.mask == 0).any(-1).all()


def test_padding_invariance_against_cropped_runs() -> None:
    # A 10x8 map with window 4 pads two rows. The bottom windows hold two real rows; if the padded
    # rows were attended, their output would differ from running on those two rows alone.
    model = one_stage(window_size=4)
    stage, block = model.layers[0], model.layers[0].blocks[0]
    x = torch.randn(1, 10, 8, 8, dtype=torch.float64)
    full = block(x, stage.window_plans(10, 8, CPU))
    top = block(x[:, :8], stage.window_plans(8, 8, CPU))
    bottom = block(x[:, 8:], stage.window_plans(2, 8, CPU))
    torch.testing.assert_close(full[:, :8], top)
    torch.testing.assert_close(full[:, 8:], bottom)


def test_mask_token_input() -> None:
    model = tiny_swin()
    x = torch.randn(2, 3, 64, 64)
    plain = model.forward_features(x)
    none_hidden = model.forward_features(x, torch.zeros(2, 16, 16, dtype=torch.bool))
    torch.testing.assert_close(none_hidden, plain, rtol=0, atol=0)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, ::2, ::3] = True
    hidden = model.forward_features(x, mask)
    assert not torch.allclose(hidden, plain)
    hidden.square().mean().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_window_cache_per_resolution() -> None:
    model = tiny_swin()
    model.forward_features(torch.randn(1, 3, 64, 64))
    assert all(len(stage.window_cache) == 1 for stage in model.layers)
    first = dict(model.layers[0].window_cache)
    model.forward_features(torch.randn(1, 3, 96, 96))
    assert all(len(stage.window_cache) == 2 for stage in model.layers)
    model.forward_features(torch.randn(1, 3, 64, 64))
    assert all(len(stage.window_cache) == 2 for stage in model.layers)
    for key, plans in first.items():
        assert model.layers[0].window_cache[key] is plans  # hit, not rebuilt
    assert (16, 16, CPU) in first


def test_grad_checkpointing_matches() -> None:
    x = torch.randn(2, 3, 64, 96)
    results = []
    for enable in (False, True):
        model = tiny_swin(num_classes=5, grad_checkpointing=enable)
        feats = model.forward_features(x)
        (model.head(model.pool(feats)).sum() + feats.square().mean()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((feats.detach(), grads))
    (f0, g0), (f1, g1) = results
    torch.testing.assert_close(f1, f0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)

"""Twins-SVT: sizes, forward/backward at odd resolutions, LSA locality and padding, GSA, masking."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from pipeline.models.twins import (
    TWINS_SIZES,
    GlobalSubSampleAttn,
    LocallyGroupedAttn,
    TwinsBlock,
    TwinsSVT,
    build_twins,
)

TINY = {"dims": (16, 32, 48, 64), "heads": (1, 2, 3, 4), "depths": (2, 2, 2, 2)}


def tiny(**overrides: object) -> TwinsSVT:
    torch.manual_seed(0)
    return build_twins("small", **{**TINY, **overrides})


def lsa_block(dim: int = 8, heads: int = 2, window: int = 7) -> TwinsBlock:
    torch.manual_seed(0)
    return TwinsBlock(dim, LocallyGroupedAttn(dim, heads, window), mlp_ratio=4.0, drop_path=0.0)


@pytest.mark.parametrize(
    ("size", "published"), [("small", 24.1e6), ("base", 56.1e6), ("large", 99.3e6)]
)
def test_param_counts_match_paper(size: str, published: float) -> None:
    model = build_twins(size, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - published) / published < 0.01, n


def test_unknown_size_names_valid_sizes() -> None:
    with pytest.raises(ValueError, match="small"):
        build_twins("huge")


def test_contract_attributes() -> None:
    model = tiny()
    assert (model.embed_dim, model.patch_size, model.mask_stride) == (64, 4, 32)
    assert model.masking == "token" and model.num_classes == 0
    assert "mask_token" in model.no_weight_decay()
    assert set(TWINS_SIZES) == {"small", "base", "large"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(224, 224), (256, 192), (160, 288), (96, 96)])
def test_forward_backward_shapes_and_grads(hw: tuple[int, int], dtype: torch.dtype) -> None:
    model = tiny(num_classes=10).to(dtype)
    # The head is zero-initialised; give it weights so gradients reach the backbone.
    torch.nn.init.normal_(model.head.weight, std=0.02)
    x = torch.randn(2, 3, *hw, dtype=dtype)
    feats = model.forward_features(x)
    h, w = -(-hw[0] // 32), -(-hw[1] // 32)
    assert feats.shape == (2, h, w, 64) and feats.dtype == dtype
    assert model.pool(feats).shape == (2, 64)
    logits = model(x)
    assert logits.shape == (2, 10)
    (logits.float().square().sum() + feats.float().mean()).backward()
    for name, p in model.named_parameters():
        if name == "mask_token":
            assert p.grad is None
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_small_inputs_and_odd_stage_sides() -> None:
    model = tiny()
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1, 1, 64)
    # 36 -> 9 -> 5 -> 3 -> 2: every later stage sees an odd side and pads it.
    out = model.forward_features(torch.randn(1, 3, 36, 36))
    assert out.shape == (1, 2, 2, 64) and torch.isfinite(out).all()


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny()(torch.randn(1, 3, 30, 32))


def test_lsa_block_is_local() -> None:
    block = lsa_block()
    x = torch.randn(1, 14, 14, 8, requires_grad=True)  # 2x2 windows of 7x7
    block(x)[0, 3, 9].sum().backward()
    touched = x.grad[0].abs().sum(-1) > 0  # (H, W)
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[0:7, 7:14] = True
    assert torch.equal(touched, expected)


def test_lsa_padded_keys_are_masked() -> None:
    attn = LocallyGroupedAttn(8, 2, window_size=7)
    x = torch.randn(2, 10, 10, 8)  # padded to 14x14: windows of 7x7, 7x3, 3x7, 3x3 real tokens
    out = attn(x)
    assert out.shape == x.shape
    for r0, r1, c0, c1 in [(0, 7, 0, 7), (0, 7, 7, 10), (7, 10, 0, 7), (7, 10, 7, 10)]:
        tokens = rearrange(x[:, r0:r1, c0:c1], "b h w d -> b (h w) d")
        q, k, v = rearrange(attn.qkv(tokens), "b n (t h d) -> t b h n d", t=3, h=2)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        ref = attn.proj(rearrange(weights @ v, "b h n d -> b n (h d)"))
        got = rearrange(out[:, r0:r1, c0:c1], "b h w d -> b (h w) d")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_lsa_window_clamped_to_small_map() -> None:
    attn = LocallyGroupedAttn(8, 2, window_size=7)
    assert attn.window_shape(3, 9) == (3, 7)
    out = attn(torch.randn(1, 3, 9, 8))
    assert out.shape == (1, 3, 9, 8) and torch.isfinite(out).all()


def test_mask_cache_one_entry_per_resolution() -> None:
    model = tiny()
    model.forward_features(torch.randn(1, 3, 96, 96))
    model.forward_features(torch.randn(1, 3, 160, 128))
    model.forward_features(torch.randn(1, 3, 96, 96))
    lsa = model.blocks[0][0].attn
    assert isinstance(lsa, LocallyGroupedAttn)
    assert len(lsa.mask_cache) == 2
    # 96 -> 24x24 grid is padded to 28x28, so that entry is a real mask.
    assert lsa.mask_cache[(24, 24, 7, 7, torch.device("cpu"))] is not None


@pytest.mark.parametrize("side", [10, 3])
def test_gsa_side_not_divisible_by_sr(side: int) -> None:
    attn = GlobalSubSampleAttn(8, 2, sr_ratio=4)
    x = torch.randn(2, side, side + 1, 8)
    out = attn(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_peg_after_first_block_of_each_stage() -> None:
    state = tiny().state_dict()
    for i, dim in enumerate(TINY["dims"]):
        assert state[f"pos_block.{i}.proj.0.weight"].shape == (dim, 1, 3, 3)
        assert f"blocks.{i}.0.attn.qkv.weight" in state  # LSA first
        assert f"blocks.{i}.1.attn.kv.weight" in state  # then GSA
    assert "blocks.0.1.attn.sr.weight" in state and "blocks.3.1.attn.sr.weight" not in state


def test_mask_token() -> None:
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    none = model.forward_features(x)
    all_false = model.forward_features(x, torch.zeros(2, 16, 16, dtype=torch.bool))
    torch.testing.assert_close(none, all_false)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :8] = True
    masked = model.forward_features(x, mask)
    assert not torch.allclose(masked, none)
    masked.sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_grad_checkpointing_matches() -> None:
    x = torch.randn(2, 3, 64, 96)
    results = []
    for ckpt in (False, True):
        model = tiny(grad_checkpointing=ckpt)
        out = model.forward_features(x)
        out.square().mean().backward()
        results.append(
            (out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_drop_path_rates_linear() -> None:
    model = tiny(drop_path_rate=0.7)
    rates = [blk.drop_path.drop_prob for stage in model.blocks for blk in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.7)
    assert rates == sorted(rates)

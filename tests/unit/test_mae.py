"""MAE / SimMIM objective: masks, mask units, targets, loss on hidden pixels only, decoder position
tables, the three backbone families end to end (shapes, gradients, bf16, the loss falls)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from pipeline.config import MaeConfig
from pipeline.methods.mae import MAE, sincos_pos_embed_2d
from pipeline.models import Backbone, build_backbone

DECODER = {"decoder_depth": 1, "decoder_dim": 32, "decoder_heads": 2}


def tiny_vit() -> Backbone:
    return build_backbone("vit_tiny_patch8", embed_dim=32, depth=2, num_heads=2, img_size=32)


def tiny_swin() -> Backbone:
    return build_backbone("swin_tiny", embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))


def tiny_twins() -> Backbone:
    return build_backbone(
        "twins_svt_small", dims=(16, 32, 32, 64), depths=(2, 1, 2, 1), heads=(1, 2, 2, 4)
    )


# family -> (backbone builder, image side); hierarchical ones need sides divisible by 32.
FAMILIES = {"vit": (tiny_vit, 32), "swin": (tiny_swin, 64), "twins": (tiny_twins, 64)}


def make_mae(family: str, **cfg: object) -> MAE:
    torch.manual_seed(0)
    return MAE(FAMILIES[family][0](), MaeConfig(**{**DECODER, **cfg}))


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields: 2x2 random values per channel, bilinearly stretched."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 2, 2, generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Masks ---------------------------------------------------------------------------------------


def test_random_masking_counts_determinism_and_restore() -> None:
    b, rows, cols, ratio = 8, 6, 4, 0.75
    m = MAE.random_masking(b, rows, cols, ratio, gen(1))
    n, n_hidden = rows * cols, round(ratio * rows * cols)
    assert m.mask.dtype == torch.bool and m.mask.shape == (b, n)
    assert (m.mask.sum(1) == n_hidden).all()
    assert m.ids_keep.shape == (b, n - n_hidden)
    assert len({tuple(row.tolist()) for row in m.mask}) == b  # every sample its own mask
    # The kept ids are exactly the visible positions.
    for row_mask, keep in zip(m.mask, m.ids_keep, strict=True):
        assert sorted(keep.tolist()) == torch.nonzero(~row_mask).flatten().tolist()
    # ids_restore undoes the shuffle [kept..., hidden...].
    ids_shuffle = m.ids_restore.argsort(1)
    x = torch.arange(n).expand(b, n)
    shuffled = torch.gather(x, 1, ids_shuffle)
    assert torch.equal(shuffled[:, : n - n_hidden], m.ids_keep)
    assert torch.equal(torch.gather(shuffled, 1, m.ids_restore), x)
    assert torch.equal(m.mask, m.ids_restore >= n - n_hidden)
    # Same seed, same masks; another seed, other masks.
    again = MAE.random_masking(b, rows, cols, ratio, gen(1))
    assert all(torch.equal(a, c) for a, c in zip(m, again, strict=True))
    assert not torch.equal(m.mask, MAE.random_masking(b, rows, cols, ratio, gen(2)).mask)


def test_random_masking_in_units_hides_whole_blocks() -> None:
    # A 64x96 image at stride 4 with 32-pixel mask units: a 2x3 unit grid of 8x8 patch blocks.
    m = MAE.random_masking(16, 16, 24, 0.6, gen(0), unit=8)
    blocks = rearrange(m.mask, "b (h i w j) -> b h w (i j)", h=2, i=8, w=3, j=8)
    assert (blocks.all(-1) | ~blocks.any(-1)).all()  # each block all hidden or all visible
    assert (blocks.all(-1).sum((1, 2)) == round(0.6 * 6)).all()
    assert m.ids_keep.shape == (16, (6 - 4) * 64)


def test_masking_never_hides_everything_and_checks_the_grid() -> None:
    assert MAE.random_masking(4, 2, 1, 0.99, gen()).mask.sum(1).tolist() == [1] * 4
    assert MAE.random_masking(4, 2, 1, 0.01, gen()).mask.sum(1).tolist() == [1] * 4
    with pytest.raises(ValueError, match="not divisible by the mask unit"):
        MAE.random_masking(1, 12, 8, 0.5, gen(), unit=8)


def test_patchify_roundtrip_layout() -> None:
    x = torch.randn(2, 3, 16, 24)
    p = MAE.patchify(x, 8)
    assert p.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(p[0, 4, :3], x[0, :, 8, 8])  # patch (1, 1), pixel (0, 0), channels
    assert torch.equal(MAE.unpatchify(p, 8, 2, 3), x)


# ViT: MAE proper -----------------------------------------------------------------------------


def test_vit_loss_is_the_mean_over_hidden_patches_only() -> None:
    model = make_mae("vit", norm_pix_loss=True)
    x = torch.randn(3, 3, 48, 32)
    out = model(x, gen())
    pred, mask = out["pred"], out["mask"]
    assert pred.shape == (3, 6 * 4, 8 * 8 * 3) and mask.shape == (3, 24)
    assert out["logs"]["mask_ratio"] == pytest.approx(18 / 24)

    target = model.target(x)
    per_patch = ((pred - target) ** 2).mean(-1)  # (B, N)
    direct = (per_patch * mask).sum() / mask.sum()
    torch.testing.assert_close(out["loss"], direct)

    weights = model.loss_weights(mask, 6, 4)
    assert weights.shape == pred.shape
    assert (weights[~mask] == 0).all() and (weights[mask] == 1).all()
    # Whatever is predicted at visible patches does not count.
    noisy = torch.where(mask.unsqueeze(-1), pred, pred + 100 * torch.randn_like(pred))
    torch.testing.assert_close(model.loss(noisy, target, weights), out["loss"])


def test_norm_pix_target_is_standardised_per_patch() -> None:
    model = make_mae("vit", norm_pix_loss=True)
    x = 3 * torch.rand(2, 3, 32, 32) + 5
    t = model.target(x)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 16), atol=1e-4, rtol=0)
    raw = make_mae("vit", norm_pix_loss=False).target(x)
    assert torch.equal(raw, MAE.patchify(x, 8))


def test_decoder_position_table_fits_any_grid_and_is_cached() -> None:
    model = make_mae("vit")
    model(torch.randn(2, 3, 48, 32), gen())  # a 6x4 patch grid
    cache = model.decoder._pos_cache
    table = cache[(6, 4, torch.device("cpu"))]
    assert table.shape == (24, 32) and not table.requires_grad
    assert model.decoder.pos_embed(6, 4, torch.device("cpu")) is table
    torch.testing.assert_close(table, sincos_pos_embed_2d(32, 6, 4))
    # Fixed, not learned: nothing of it is in the parameters or the state dict.
    assert not any("pos" in k for k in model.decoder.state_dict())
    # Neighbouring cells are closer than distant ones, in both directions.
    grid = rearrange(table, "(h w) d -> h w d", h=6)
    assert (grid[0, 0] - grid[0, 1]).norm() < (grid[0, 0] - grid[0, 3]).norm()
    assert (grid[0, 0] - grid[1, 0]).norm() < (grid[0, 0] - grid[5, 0]).norm()


def test_vit_mask_units_larger_than_the_patch() -> None:
    model = make_mae("vit", mask_patch_size=16, mask_ratio=0.5)
    out = model(torch.randn(2, 3, 32, 64), gen())  # 4x8 patches, 2x4 units of 2x2 patches
    blocks = rearrange(out["mask"], "b (h i w j) -> b h w (i j)", h=2, i=2, w=4, j=2)
    assert (blocks.all(-1) | ~blocks.any(-1)).all()
    assert (out["mask"].sum(1) == 4 * 4).all()
    with pytest.raises(ValueError, match="sides divisible by 16"):
        model(torch.randn(1, 3, 24, 32), gen())


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="decoder_depth=0"):
        MAE(tiny_vit(), MaeConfig(decoder_depth=0))
    with pytest.raises(ValueError, match="mask_patch_size=12"):
        MAE(tiny_vit(), MaeConfig(mask_patch_size=12, **DECODER))
    with pytest.raises(ValueError, match="decoder_dim=30"):
        MAE(tiny_vit(), MaeConfig(decoder_depth=1, decoder_dim=30, decoder_heads=2))


# Swin / Twins: SimMIM ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["swin", "twins"])
def test_hierarchical_mask_reaches_the_encoder_and_loss_counts_hidden_pixels(family: str) -> None:
    model = make_mae(family, loss="l1", norm_pix_loss=True, mask_ratio=0.6)
    seen: list[torch.Tensor] = []
    features = model.backbone.forward_features

    def spy(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(mask)
        return features(x, mask=mask)

    model.backbone.forward_features = spy  # type: ignore[method-assign]
    x = torch.randn(2, 3, 64, 96)
    out = model(x, gen(3))
    pred, mask = out["pred"], out["mask"]
    assert pred.shape == x.shape and mask.shape == (2, 16 * 24)

    # The encoder got the stride-4 grid, with whole 32x32 units (8x8 patches) hidden.
    (grid,) = seen
    assert grid.shape == (2, 16, 24) and torch.equal(grid.flatten(1), mask)
    units = rearrange(grid, "b (h i) (w j) -> b h w (i j)", i=8, j=8)
    assert (units.all(-1) | ~units.any(-1)).all()
    assert (units.all(-1).sum((1, 2)) == round(0.6 * 6)).all()

    # SimMIM's loss, computed at full resolution: l1 over hidden pixels / (pixels * channels).
    target = MAE.unpatchify(model.target(x), 32, 2, 3)  # (B, C, H, W)
    pixels = repeat(grid.float(), "b h w -> b c (h p) (w q)", c=3, p=4, q=4)
    direct = ((pred - target).abs() * pixels).sum() / pixels.sum()
    torch.testing.assert_close(out["loss"], direct)
    assert out["logs"]["mask_ratio"] == pytest.approx(4 / 6)


def test_simmim_linear_head() -> None:
    model = make_mae("swin", decoder_depth=0, loss="l1")
    names = [n for n, _ in model.decoder.named_parameters()]
    assert names == ["pred.weight", "pred.bias"]
    assert model.decoder.pred.weight.shape == (32 * 32 * 3, model.backbone.embed_dim)
    out = model(torch.randn(2, 3, 64, 64), gen())
    assert out["pred"].shape == (2, 3, 64, 64) and torch.isfinite(out["loss"])


@pytest.mark.parametrize("family", ["swin", "twins"])
def test_hierarchical_input_must_fit_the_mask_grid(family: str) -> None:
    model = make_mae(family)
    with pytest.raises(ValueError, match="sides divisible by 32"):
        model(torch.randn(1, 3, 64, 48), gen())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64), gen())


# All three families --------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_gets_a_gradient(family: str) -> None:
    model = make_mae(family)
    side = FAMILIES[family][1]
    model(torch.randn(2, 3, side, side), gen())["loss"].backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
    ]  # the backbones here have no classifier, so nothing is exempt
    assert not missing, missing


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_autocast(family: str) -> None:
    model = make_mae(family)
    side = FAMILIES[family][1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, side, side), gen())
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


def held_out_loss(model: MAE, images: torch.Tensor) -> float:
    """Mean loss over four fixed masks that training never draws: no mask-to-mask noise."""
    with torch.no_grad():
        return sum(model(images, gen(100 + i))["loss"].item() for i in range(4)) / 4


@pytest.mark.parametrize(
    ("family", "depth"), [("vit", 1), ("swin", 0), ("twins", 1)]
)  # Swin with SimMIM's linear head; Twins covers the transformer decoder on a token backbone.
def test_loss_falls_on_a_fixed_batch(family: str, depth: int) -> None:
    # Fresh random masks every step (the generator advances): the model must learn to fill
    # hidden regions from visible ones, not memorise one mask. Measured before and after on the
    # same held-out masks, since the per-step loss swings with how much each mask hides.
    model = make_mae(family, norm_pix_loss=False, loss="l2", decoder_depth=depth)
    side = FAMILIES[family][1]
    images = smooth_images(4, side, side)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = gen()
    before = held_out_loss(model, images)
    for _ in range(30):
        loss = model(images, g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss(model, images)
    assert after < 0.7 * before, (family, before, after)


def test_no_weight_decay_names() -> None:
    model = make_mae("vit")
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd <= set(names)
    for name in [
        "decoder.mask_token",
        "decoder.embed.bias",
        "decoder.norm.weight",
        "backbone.cls_token",
        "backbone.pos_embed",
    ]:
        assert name in nwd
    assert "decoder.embed.weight" not in nwd and "backbone.blocks.0.attn.qkv.weight" not in nwd
    assert {n for n in nwd if n.startswith("decoder.")} == {
        n for n, p in names.items() if n.startswith("decoder.") and (p.ndim <= 1 or "mask" in n)
    }


def test_default_generator_when_none_is_passed() -> None:
    model = make_mae("vit")
    torch.manual_seed(5)
    a = model(torch.zeros(1, 3, 32, 32))["mask"]
    torch.manual_seed(5)
    assert torch.equal(a, model(torch.zeros(1, 3, 32, 32))["mask"])

"""Twins-SVT backbone (Chu et al. 2021, "Twins: Revisiting the Design of Spatial Attention").

Holds the two attention kinds that alternate inside every stage (LSA: locally-grouped attention in
non-overlapping windows; GSA: global attention to a sub-sampled key/value map), the PEG position
encoding (a depthwise conv after each stage's first block), the four-stage `TwinsSVT` backbone and
`build_twins` with the published sizes. Parameter names follow timm so weights can be exported.

Any input whose sides are multiples of 4 is accepted, which the fixed-size reference code does not
do: LSA pads the map to whole windows and masks the padded keys out, GSA zero-pads the map to a
multiple of its sub-sampling ratio before the strided conv, and stage patch embeddings pad odd sides
to even. Every block works on channels-last grids (B, H, W, D).

Not here: Twins-PCPVT (the PVT-style variant), weight loading/export, device placement (see
`pipeline/train/`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from pipeline.models.base import Backbone, make_head
from pipeline.models.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    apply_mask_token,
    check_input,
    drop_path_rates,
    init_weights,
    run_blocks,
)

TWINS_SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "small": {"dims": (64, 128, 256, 512), "heads": (2, 4, 8, 16), "depths": (2, 2, 10, 4)},
    "base": {"dims": (96, 192, 384, 768), "heads": (3, 6, 12, 24), "depths": (2, 2, 18, 2)},
    "large": {"dims": (128, 256, 512, 1024), "heads": (4, 8, 16, 32), "depths": (2, 2, 18, 2)},
}

# The reference code builds every block norm with eps=1e-6; patch-embed and GSA norms keep 1e-5.
_BLOCK_NORM_EPS = 1e-6


def _pad_grid(x: torch.Tensor, mult_h: int, mult_w: int) -> torch.Tensor:
    """Zero-pad a channels-last grid (B, H, W, D) at the bottom/right to multiples of the sides."""
    pad_h, pad_w = -x.shape[1] % mult_h, -x.shape[2] % mult_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def window_key_mask(
    height: int, width: int, win_h: int, win_w: int, num_heads: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean SDPA mask (1, nW * heads, 1, N): True for keys that are real (not padding) tokens.

    Rows follow the `(nh nw h)` head layout of `LocallyGroupedAttn`; the query axis broadcasts.
    None when the map tiles into whole windows, so the unmasked fused kernels can run.
    """
    if height % win_h == 0 and width % win_w == 0:
        return None
    rows = torch.arange(math.ceil(height / win_h) * win_h, device=device) < height
    cols = torch.arange(math.ceil(width / win_w) * win_w, device=device) < width
    valid = rows[:, None] & cols[None, :]  # (Hp, Wp)
    return repeat(
        valid, "(nh wh) (nw ww) -> 1 (nh nw h) 1 (wh ww)", wh=win_h, ww=win_w, h=num_heads
    ).contiguous()


class LocallyGroupedAttn(nn.Module):
    """LSA: multi-head attention inside non-overlapping windows of a (B, H, W, D) grid.

    The window is clamped per side to the map when the map is smaller. Maps that do not tile are
    zero-padded at the bottom/right; the padded keys are masked out (the reference code lets them
    attend), so outputs on real tokens do not depend on the padding. Masks are built per
    (H, W, window, device) on first use and cached in `mask_cache`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.mask_cache: dict[tuple[int, int, int, int, torch.device], torch.Tensor | None] = {}

    def window_shape(self, height: int, width: int) -> tuple[int, int]:
        """Window (rows, cols) used on a map of this size."""
        return min(self.window_size, height), min(self.window_size, width)

    def attn_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        """Cached padding mask for this map size (None when no padding is needed)."""
        win_h, win_w = self.window_shape(height, width)
        key = (height, width, win_h, win_w, device)
        if key not in self.mask_cache:
            self.mask_cache[key] = window_key_mask(
                height, width, win_h, win_w, self.num_heads, device
            )
        return self.mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, _ = x.shape
        win_h, win_w = self.window_shape(height, width)
        mask = self.attn_mask(height, width, x.device)
        x = _pad_grid(x, win_h, win_w)
        # Windows go into the head axis, so SDPA sees plain 4-D (B, heads, N, d) inputs and the
        # mask broadcasts over the batch.
        q, k, v = rearrange(
            self.qkv(x),
            "b (nh wh) (nw ww) (t h d) -> t b (nh nw h) (wh ww) d",
            wh=win_h,
            ww=win_w,
            t=3,
            h=self.num_heads,
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = rearrange(
            out,
            "b (nh nw h) (wh ww) d -> b (nh wh) (nw ww) (h d)",
            nh=x.shape[1] // win_h,
            h=self.num_heads,
            wh=win_h,
        )
        return self.proj(out[:, :height, :width])


class GlobalSubSampleAttn(nn.Module):
    """GSA: every token attends to a map sub-sampled by a strided conv (+ LayerNorm) when sr > 1.

    When a side is not a multiple of sr, the map is zero-padded at the bottom/right before the conv
    (i.e. ceil division), so no token is dropped from the keys and a map smaller than sr still
    yields one key position; the edge cells then average real tokens with zeros.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # Without sub-sampling there is no conv/norm at all (matches the reference parameter set).
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, _, _ = x.shape
        q = rearrange(self.q(x), "b y x (h d) -> b h (y x) d", h=self.num_heads)
        kv_in = x
        if self.sr is not None and self.norm is not None:
            kv_in = _pad_grid(x, self.sr_ratio, self.sr_ratio)
            kv_in = self.sr(rearrange(kv_in, "b y x c -> b c y x"))
            kv_in = self.norm(rearrange(kv_in, "b c y x -> b y x c"))
        k, v = rearrange(self.kv(kv_in), "b y x (t h d) -> t b h (y x) d", t=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h (y x) d -> b y x (h d)", y=height))


class PosConv(nn.Module):
    """PEG (conditional position encoding): residual depthwise 3x3 conv over the grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # A Sequential only so the weight is named `proj.0`, as in the reference checkpoints.
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, stride=1, padding=1, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(rearrange(x, "b h w d -> b d h w"))
        return x + rearrange(y, "b d h w -> b h w d")


class TwinsBlock(nn.Module):
    """Pre-norm transformer block on a (B, H, W, D) grid with an LSA or GSA attention."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TwinsSVT(Backbone):
    """Twins-SVT: four stages of alternating LSA/GSA blocks, PEG after each stage's first block.

    `forward_features(x, mask)` returns the normed final map (B, H/32, W/32, D) (sides rounded up
    when a stage sees an odd side); `mask` (B, H/4, W/4), True = hidden, replaces those stage-0
    patch embeddings by `mask_token` (SimMIM).
    """

    patch_size = 4
    mask_stride = 32
    masking = "token"
    no_weight_decay_keywords = ("mask_token",)

    def __init__(
        self,
        dims: Sequence[int],
        heads: Sequence[int],
        depths: Sequence[int],
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        *,
        in_chans: int = 3,
        num_classes: int = 0,
        mlp_ratio: float = 4.0,
        window_size: int = 7,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        num_stages = len(dims)
        if not (len(heads) == len(depths) == len(sr_ratios) == num_stages):
            raise ValueError(
                f"dims/heads/depths/sr_ratios need one entry per stage, got {len(dims)}/"
                f"{len(heads)}/{len(depths)}/{len(sr_ratios)}"
            )
        if min(depths) < 1:
            raise ValueError(f"every stage needs at least one block, got depths {tuple(depths)}")
        self.embed_dim = dims[-1]
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.window_size = window_size

        self.patch_embeds = nn.ModuleList(
            PatchEmbed(4 if i == 0 else 2, in_chans if i == 0 else dims[i - 1], dims[i], norm=True)
            for i in range(num_stages)
        )
        self.pos_block = nn.ModuleList(PosConv(d) for d in dims)
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        self.blocks = nn.ModuleList()
        for dim, nh, depth, sr in zip(dims, heads, depths, sr_ratios, strict=True):
            stage = nn.ModuleList()
            for j in range(depth):
                attn: nn.Module
                if j % 2 == 0:
                    attn = LocallyGroupedAttn(dim, nh, window_size, qkv_bias)
                else:
                    attn = GlobalSubSampleAttn(dim, nh, sr, qkv_bias)
                stage.append(TwinsBlock(dim, attn, mlp_ratio, next(rates)))
            self.blocks.append(stage)
        self.norm = nn.LayerNorm(dims[-1], eps=_BLOCK_NORM_EPS)
        self.mask_token = nn.Parameter(torch.zeros(dims[0]))

        self.apply(_init_twins)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # After `apply`, so the head keeps the zero init shared by every backbone.
        self.head = make_head(self.embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images -> normed channels-last map (B, h, w, D); see class docstring."""
        check_input(x, self.patch_size, type(self).__name__)
        for i, (embed, pos, stage) in enumerate(
            zip(self.patch_embeds, self.pos_block, self.blocks, strict=True)
        ):
            if i > 0:
                # Stride-2 embeddings need even sides: pad odd ones rather than drop a row.
                x = rearrange(_pad_grid(x, 2, 2), "b h w d -> b d h w")
            x = embed(x)  # (B, H, W, D)
            if i == 0:
                x = apply_mask_token(x, mask, self.mask_token)
            x = run_blocks(stage[:1], x, self.grad_checkpointing)
            x = pos(x)
            x = run_blocks(stage[1:], x, self.grad_checkpointing)
        return self.norm(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global average over the (B, h, w, D) map -> (B, D)."""
        return features.mean(dim=(1, 2))


def _init_twins(module: nn.Module) -> None:
    """Trunc-normal linears, unit norms, fan-out normal convs (the reference Twins init)."""
    init_weights(module)
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        fan_out //= module.groups
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_twins(size: str, **overrides: object) -> TwinsSVT:
    """Twins-SVT of a published size ("small", "base", "large"); `overrides` go to `TwinsSVT`.

    Common overrides: num_classes, in_chans, drop_path_rate, window_size, grad_checkpointing, and
    dims/heads/depths/sr_ratios for tiny test configurations.
    """
    if size not in TWINS_SIZES:
        raise ValueError(f"unknown Twins-SVT size {size!r}; valid sizes: {sorted(TWINS_SIZES)}")
    cfg: dict[str, object] = {**TWINS_SIZES[size], **overrides}
    return TwinsSVT(**cfg)  # type: ignore[arg-type]

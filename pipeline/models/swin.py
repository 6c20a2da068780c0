"""Swin Transformer backbone (Liu et al. 2021): shifted-window attention over a 4-stage pyramid.

Holds `SwinTransformer`, its parts (window attention, block, patch merging, stage), the size table
`SWIN_SIZES` and the builder `build_swin`. Parameter names follow timm's Swin
(`layers.{i}.blocks.{j}`, `layers.{i}.downsample`, `head.fc`), so exported state dicts load there
unchanged.

Any input with sides divisible by 4 runs: each stage pads its map up to whole windows and masks the
padded keys out, clamps the window to the map where the map is smaller, and builds its shift/padding
masks lazily per resolution (cached per device), never fixed at construction. Attention goes
through `F.scaled_dot_product_attention`, with relative position bias and masks as one additive
`attn_mask`.

Not here: SimMIM mask generation and the decoder (`pipeline/methods/`), device placement, and the
registry of backbone names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pipeline.models.base import Backbone, make_head
from pipeline.models.layers import (
    Attention,
    DropPath,
    Mlp,
    PatchEmbed,
    apply_mask_token,
    check_input,
    drop_path_rates,
    init_weights,
    run_blocks,
)

SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)},
}


def relative_position_index(window: tuple[int, int], table_window: int) -> torch.Tensor:
    """Row of the (2w-1)^2 bias table for every (query, key) pair of a `window` = (wh, ww).

    The table is laid out for a full `table_window` square; a smaller window (a stage whose map is
    smaller than the window) reads the same rows for the same relative offsets, so the table's shape
    never depends on the input resolution. Returns (N, N) long, N = wh * ww, row-major positions.
    """
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(
        1
    )  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
    w = table_window
    return (rel[0] + w - 1) * (2 * w - 1) + (rel[1] + w - 1)


@dataclass(frozen=True)
class WindowPlan:
    """How one block partitions a map of a given size: everything its attention needs.

    `mask` is additive (0 or -inf), (num_windows, N, N) in float32, or None when every window is
    whole and unshifted (then the bias alone is the attention mask).
    """

    window: tuple[int, int]
    shift: tuple[int, int]
    padded: tuple[int, int]
    rel_index: torch.Tensor
    mask: torch.Tensor | None


def _window_mask(
    size: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    padded: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """Additive (num_windows, N, N) mask: -inf where a key is padding or from another region."""
    (h, w), (wh, ww), (sh, sw), (hp, wp) = size, window, shift, padded
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    # In unrolled coordinates the shifted windows are the regular grid offset by the shift and cut
    # at the map border (Swin sec. 3.2); the cyclic roll only batches them. So the pieces that wrap
    # around into one rolled window carry different group ids and never attend to each other.
    row_group = torch.div(rows - sh, wh, rounding_mode="floor") + 1  # 0 .. hp // wh
    col_group = torch.div(cols - sw, ww, rounding_mode="floor") + 1  # 0 .. wp // ww
    group = row_group[:, None] * (wp // ww + 1) + col_group[None, :]  # (Hp, Wp)
    valid = (rows < h)[:, None] & (cols < w)[None, :]  # (Hp, Wp)
    # Same roll and partition as the features, so mask rows line up with window tokens.
    group, valid = (torch.roll(t, shifts=(-sh, -sw), dims=(0, 1)) for t in (group, valid))
    group = rearrange(group, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=wh, ww=ww)
    valid = rearrange(valid, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=wh, ww=ww)
    allowed = (group[:, :, None] == group[:, None, :]) & valid[:, None, :]  # (nW, N, N)
    # A padded query can find no valid key in its region; letting every token see itself keeps its
    # softmax finite (no NaN in forward or backward). Its output is cropped away anyway.
    allowed |= torch.eye(wh * ww, dtype=torch.bool, device=device)
    zeros = torch.zeros(allowed.shape, device=device)
    return zeros.masked_fill(~allowed, float("-inf"))


def window_plan(
    size: tuple[int, int], window_size: int, shifted: bool, device: torch.device
) -> WindowPlan:
    """Window, shift, padding and masks for one block on a map of `size` = (H, W).

    Per dimension: a side no larger than the window takes the side as its window and no shift
    (a single window sees everything already); otherwise the full window, shifted by half of it on
    shifted blocks, and the side is padded up to a multiple of the window.
    """
    window = tuple(min(window_size, s) for s in size)
    shift = tuple(window_size // 2 if shifted and s > window_size else 0 for s in size)
    padded = tuple(math.ceil(s / w) * w for s, w in zip(size, window, strict=True))
    mask = None
    if any(shift) or padded != tuple(size):
        mask = _window_mask(size, window, shift, padded, device)
    rel_index = relative_position_index(window, window_size).to(device)
    return WindowPlan(window, shift, padded, rel_index, mask)


class WindowAttention(Attention):
    """Multi-head attention inside windows with a learned relative position bias per head."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:  # type: ignore[override]
        """Attend within each window of x (B, num_windows, N, D), windows in `plan` order."""
        num_windows = x.shape[1]
        bias = rearrange(self.relative_position_bias_table[plan.rel_index], "i j h -> h i j")
        if plan.mask is None:
            attn_mask = bias.unsqueeze(0)  # (1, h, N, N): the same for every window
        else:
            attn_mask = plan.mask.to(bias.dtype).unsqueeze(1) + bias  # (nW, h, N, N)
        # Windows fold into the head axis, so SDPA sees plain 4-D (B, nW * h, N, d) inputs and the
        # per-window mask broadcasts over the batch instead of being copied per image.
        q, k, v = rearrange(self.qkv(x), "b w n (t h d) -> t b (w h) n d", t=3, h=self.num_heads)
        attn_mask = attn_mask.expand(num_windows, -1, -1, -1).reshape(1, -1, *bias.shape[1:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        return self.proj(rearrange(out, "b (w h) n d -> b w n (h d)", w=num_windows))


class SwinBlock(nn.Module):
    """Pre-norm transformer block with (shifted-)window attention on a (B, H, W, C) map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shifted: bool,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, plans: tuple[WindowPlan, WindowPlan]) -> torch.Tensor:
        """x (B, H, W, C) -> same shape; `plans` = (unshifted, shifted) for this map size."""
        x = x + self.drop_path1(self._window_attention(self.norm1(x), plans[self.shifted]))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def _window_attention(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        h, w = x.shape[1:3]
        (wh, ww), (sh, sw), (hp, wp) = plan.window, plan.shift, plan.padded
        # Pad after the norm, so padded tokens are exact zeros; they are masked as keys anyway.
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))  # (B, Hp, Wp, C)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        windows = rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=wh, ww=ww)
        windows = self.attn(windows, plan)
        x = rearrange(windows, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=hp // wh, wh=wh)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :h, :w]


class PatchMerging(nn.Module):
    """Halve the resolution, double the width: concat 2x2 neighbours -> LayerNorm -> Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sides are zero-padded."""
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Channel order (col offset, row offset, c) is timm's x0, x1, x2, x3 concat order, which
        # exported `reduction` weights depend on.
        x = rearrange(x, "b (h p) (w q) c -> b h w (q p c)", p=2, q=2)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging followed by blocks alternating regular and shifted windows.

    Window plans are built on the first call at a map size and cached in `window_cache`, keyed by
    (H, W, device): one entry per resolution holding the (unshifted, shifted) pair.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float,
        drop_paths: list[float],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, bool(j % 2), mlp_ratio, drop_paths[j])
            for j in range(depth)
        )
        self.window_cache: dict[tuple[int, int, torch.device], tuple[WindowPlan, WindowPlan]] = {}

    def window_plans(
        self, height: int, width: int, device: torch.device
    ) -> tuple[WindowPlan, WindowPlan]:
        """(unshifted, shifted) plans for a map of this size, from the cache when built before."""
        key = (height, width, device)
        if key not in self.window_cache:
            size = (height, width)
            self.window_cache[key] = (
                window_plan(size, self.window_size, False, device),
                window_plan(size, self.window_size, True, device),
            )
        return self.window_cache[key]

    def forward(self, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
        """x (B, H, W, C_in) -> (B, H', W', C) with H' = ceil(H/2) when merging, else H."""
        x = self.downsample(x)
        plans = self.window_plans(x.shape[1], x.shape[2], x.device)
        return run_blocks(self.blocks, x, grad_checkpointing, plans)


class ClassifierHead(nn.Module):
    """`head.fc` as in timm: a zero-initialised linear layer, or identity without classes."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = make_head(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class SwinTransformer(Backbone):
    """Hierarchical backbone: stride-4 patches, four stages at strides 4, 8, 16, 32.

    `forward_features` returns the final channels-last map (B, ~H/32, ~W/32, 8 * embed_dim)
    after the last norm; hidden patches (SimMIM) are replaced by `mask_token` at the input.
    """

    masking = "token"
    patch_size = 4
    mask_stride = 32
    no_weight_decay_keywords = ("relative_position_bias_table", "mask_token")

    def __init__(
        self,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        name: str = "swin",
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        self.name = name
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.embed_dim = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim, norm=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    dim=embed_dim * 2**i,
                    depth=depth,
                    num_heads=heads,
                    window_size=window_size,
                    downsample=i > 0,
                    mlp_ratio=mlp_ratio,
                    drop_paths=rates[start : start + depth],
                )
            )
        self.norm = nn.LayerNorm(self.embed_dim)
        self.apply(init_weights)
        for stage in self.layers:
            for blk in stage.blocks:
                nn.init.trunc_normal_(blk.attn.relative_position_bias_table, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # Built after `apply(init_weights)`, which would overwrite the zero-initialised classifier.
        self.head = ClassifierHead(self.embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) -> channels-last (B, H', W', D); `mask` (B, H/4, W/4), True = hidden."""
        check_input(x, self.patch_size, self.name)
        x = self.patch_embed(x)  # (B, H/4, W/4, embed)
        x = apply_mask_token(x, mask, self.mask_token)
        for stage in self.layers:
            x = stage(x, self.grad_checkpointing)
        return self.norm(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Mean over the spatial grid: (B, H, W, D) -> (B, D)."""
        return features.mean(dim=(1, 2))


def build_swin(size: str, **overrides: Any) -> SwinTransformer:
    """Swin of a named size (`SWIN_SIZES`); keyword overrides go to `SwinTransformer`."""
    if size not in SWIN_SIZES:
        raise ValueError(f"unknown Swin size {size!r}; valid sizes: {', '.join(SWIN_SIZES)}")
    kwargs = {"name": f"swin_{size}", **SWIN_SIZES[size], **overrides}
    return SwinTransformer(**kwargs)

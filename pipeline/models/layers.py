"""Blocks shared by every backbone: attention, MLP, drop path, layer scale, patch embedding.

Attention always goes through `F.scaled_dot_product_attention`, so the fused kernels run on GPU and
masks (block-diagonal packing, shifted windows, padding) are passed as `attn_mask`. Nothing here
knows about devices, ranks or DeepSpeed: placement lives in `pipeline/train/`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT); `init=None` at the call site means no layer scale."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def layer_scale(dim: int, init: float | None) -> nn.Module:
    """LayerScale when `init` is set, identity otherwise."""
    return LayerScale(dim, init) if init is not None else nn.Identity()


class Mlp(nn.Module):
    """Two-layer perceptron with GELU, as in every transformer block here."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over (..., N, D) tokens.

    `attn_mask` follows `scaled_dot_product_attention`: boolean (True = may attend) or an additive
    float bias, broadcastable to (..., heads, N, N).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "... n (t h d) -> t ... h n d", t=3, h=self.num_heads)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "... h n d -> ... n (h d)"))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution; returns channels-last (B, H, W, D)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: bool = False) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not divisible by the patch size {p}")
        return self.norm(rearrange(self.proj(x), "b d h w -> b h w d"))


def check_input(x: torch.Tensor, stride: int, name: str) -> None:
    """Raise, naming the backbone, unless x is (B, C, H, W) with sides divisible by `stride`."""
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(f"{name}: input {h}x{w} must have sides divisible by {stride}")


def apply_mask_token(
    x: torch.Tensor, mask: torch.Tensor | None, mask_token: torch.Tensor
) -> torch.Tensor:
    """Replace masked positions of a (B, H, W, D) grid by the learned token (SimMIM input).

    `mask` is boolean (B, H, W) over the same grid, True where the patch is hidden.
    """
    if mask is None:
        return x
    if mask.shape != x.shape[:3]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the patch grid {tuple(x.shape[:3])}"
        )
    w = mask.unsqueeze(-1).to(x.dtype)
    return x * (1.0 - w) + mask_token.to(x.dtype) * w


def run_blocks(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    grad_checkpointing: bool,
    *args: object,
) -> torch.Tensor:
    """Run `blocks` in order, recomputing activations in backward when checkpointing is on."""
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, *args, use_reentrant=False)
        else:
            x = blk(x, *args)
    return x


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear weights, zero biases, unit norms (ViT/Swin/Twins convention)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing stochastic-depth rates over `depth` blocks, 0 at the first."""
    if depth <= 1:
        return [0.0] * depth
    return [rate * i / (depth - 1) for i in range(depth)]

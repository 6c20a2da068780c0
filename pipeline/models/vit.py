"""Vision Transformer (Dosovitskiy et al.; DeiT sizes) with three entry points.

- `forward_features(x, keep=None)`: an image batch of any size divisible by the patch size; learned
  position embeddings are resized bicubically to the input grid. `keep` (B, K) selects patch tokens
  after position embedding, which is how MAE runs the encoder on visible patches only.
- `forward_packed(batch)`: NaViT packing; several images of different sizes share one sequence with
  block-diagonal attention, and each image gets the same features as when run alone.
- `forward(x)`: pooled embedding (cls, mean or attention pooling), or logits with `num_classes`;
  of every image of a `PackedBatch` too. With `masks` and a `mask_token`, the masked patches enter
  the blocks as the mask token (iBOT's student); `patch_tokens=True` also returns the final patch
  tokens (iBOT's targets and predictions).

Register tokens (`num_registers`, Darcet et al. 2024) are learned tokens after the class token,
without a position embedding; they take part in attention only, and no pooling reads them. They
count in `num_prefix_tokens` (every token before the patches), so packing and MAE leave room for
them; the position table has a row for the class token only.

Parameter names follow timm's ViT so exported weights load there.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from pipeline.data.packing import PackedBatch
from pipeline.models.base import Backbone, make_head
from pipeline.models.layers import (
    Attention,
    DropPath,
    Mlp,
    PatchEmbed,
    check_input,
    drop_path_rates,
    init_weights,
    layer_scale,
    run_blocks,
)

# size -> (embed_dim, depth, num_heads): ViT paper (base/large/huge), DeiT (tiny/small).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

Pooling = Literal["cls", "mean", "map"]


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale and stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        layer_scale_init: float | None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = layer_scale(dim, layer_scale_init)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = layer_scale(dim, layer_scale_init)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AttentionPool(nn.Module):
    """Multihead attention pooling (MAP): a learned query attends over the tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def forward(
        self, x: torch.Tensor, queries: int = 1, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, D) tokens -> (B, queries, D); `attn_mask` (B, queries, N), True = may attend."""
        b = x.shape[0]
        q = self.q(self.latent.expand(b, queries, -1))
        q = rearrange(q, "b m (h d) -> b h m d", h=self.num_heads)
        k, v = rearrange(self.kv(x), "b n (t h d) -> t b h n d", t=2, h=self.num_heads)
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(1)  # (B, 1, M, N): same mask for every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(rearrange(out, "b h m d -> b m (h d)"))
        return out + self.mlp(self.norm(out))


class VisionTransformer(Backbone):
    """ViT backbone; see the module docstring for its entry points."""

    masking = "drop"
    no_weight_decay_keywords = ("pos_embed", "cls_token", "reg_token", "latent")

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 16,
        img_size: int = 224,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        class_token: bool = True,
        pool: Pooling = "cls",
        layer_scale_init: float | None = None,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
        grad_checkpointing: bool = False,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        if pool == "cls" and not class_token:
            raise ValueError("pool='cls' needs class_token=True")
        if num_registers < 0:
            raise ValueError(f"num_registers={num_registers} must be >= 0")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.mask_stride = patch_size
        self.num_classes = num_classes
        self.pool_type = pool
        self.num_cls_tokens = 1 if class_token else 0  # prefix tokens with a position embedding
        self.num_registers = num_registers
        self.num_prefix_tokens = self.num_cls_tokens + num_registers
        self.grad_checkpointing = grad_checkpointing
        self.base_grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        )
        n_pos = self.num_cls_tokens + self.base_grid**2
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, dpr, layer_scale_init)
            for dpr in drop_path_rates(drop_path_rate, depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = AttentionPool(embed_dim, num_heads, mlp_ratio) if pool == "map" else None
        self.head = make_head(embed_dim, num_classes)
        # grid (rows, cols) + device -> bicubic resize matrices; see `_pos_resize_matrices`.
        self._resize_cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, ...]] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.trunc_normal_(self.reg_token, std=1e-6)
        # Patch projection initialised like a linear layer (MAE), not like a conv.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for name, module in self.named_modules():
            if name != "head":
                init_weights(module)

    # Position embeddings ---------------------------------------------------------------------

    def _pos_resize_matrices(
        self, rows: int, cols: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bicubic resize of the base grid to (rows, cols) as two matrices, cached per grid.

        PyTorch's bicubic upsampling is separable, so resizing the (g, g, D) table equals
        `A_rows @ table @ A_cols^T`. The matrices hold no autograd state, so unlike a cached
        resized table they stay valid while the embedding trains.
        """
        key = (rows, cols, device)
        if key not in self._resize_cache:
            g = self.base_grid
            eye = torch.eye(g, dtype=torch.float64).view(g, 1, g, 1)  # each row a 1-D basis image
            a_rows = F.interpolate(eye, size=(rows, 1), mode="bicubic", align_corners=False)
            eye_t = eye.view(g, 1, 1, g)
            a_cols = F.interpolate(eye_t, size=(1, cols), mode="bicubic", align_corners=False)
            self._resize_cache[key] = (
                a_rows.view(g, rows).T.float().to(device),  # (rows, g)
                a_cols.view(g, cols).T.float().to(device),  # (cols, g)
            )
        return self._resize_cache[key]

    def patch_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a (rows, cols) patch grid, row-major: (rows * cols, D)."""
        table = self.pos_embed[0, self.num_cls_tokens :]
        if (rows, cols) == (self.base_grid, self.base_grid):
            return table
        grid = rearrange(table, "(h w) d -> h w d", h=self.base_grid)
        a_rows, a_cols = self._pos_resize_matrices(rows, cols, table.device)
        out = torch.einsum("ih,hwd,jw->ijd", a_rows.to(grid.dtype), grid, a_cols.to(grid.dtype))
        return rearrange(out, "h w d -> (h w) d")

    def _prefix(self, batch: int) -> torch.Tensor:
        """Class token with its position embedding, then the registers: (B, prefix, D)."""
        parts = [] if self.cls_token is None else [self.cls_token + self.pos_embed[:, :1]]
        if self.reg_token is not None:
            parts.append(self.reg_token)
        if not parts:
            return self.pos_embed.new_zeros(batch, 0, self.embed_dim)
        prefix = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return prefix.expand(batch, -1, -1)

    # Entry points ----------------------------------------------------------------------------

    def embed(
        self,
        x: torch.Tensor,
        masks: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch tokens with position embeddings: (B, C, H, W) -> (B, N, D), no prefix.

        `masks` (B, N) bool: those patches become `mask_token` (broadcast to (B, N, D)) before
        the position embedding is added, so a masked token still knows where it is.
        """
        check_input(x, self.patch_size, type(self).__name__)
        grid = self.patch_embed(x)  # (B, h, w, D)
        rows, cols = grid.shape[1:3]
        tokens = rearrange(grid, "b h w d -> b (h w) d")
        if masks is not None and mask_token is not None:
            tokens = torch.where(masks.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
        return tokens + self.patch_pos_embed(rows, cols)

    def forward_tokens(
        self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Prefix + blocks + final norm over already-embedded patch tokens (B, K, D)."""
        x = torch.cat([self._prefix(tokens.shape[0]).to(tokens.dtype), tokens], dim=1)
        x = run_blocks(self.blocks, x, self.grad_checkpointing, attn_mask)
        return self.norm(x)

    def forward_features(
        self,
        x: torch.Tensor,
        keep: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + K, D); `keep` (B, K) long picks the patch tokens kept;
        `masks` (B, N) bool replaces patches by `mask_token` (see `embed`)."""
        tokens = self.embed(x, masks, mask_token)
        if keep is not None:
            tokens = torch.gather(tokens, 1, repeat(keep, "b k -> b k d", d=tokens.shape[-1]))
        return self.forward_tokens(tokens)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens -> (B, D) by the configured pooling."""
        if self.pool_type == "cls":
            return features[:, 0]
        if self.pool_type == "mean":
            return features[:, self.num_prefix_tokens :].mean(dim=1)
        return self.attn_pool(features)[:, 0]

    def forward(
        self,
        x: torch.Tensor | PackedBatch,
        masks: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        patch_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pooled embedding (or logits) per image; a `PackedBatch` gives them in its caller's
        order (`forward_packed`), so multi-crop code runs packed views unchanged.

        `masks` (B, N) bool with `mask_token` (1, D): masked patches enter as the mask token.
        `patch_tokens`: return `(pooled, final patch tokens (B, N, D))`. Both go through
        `__call__` (never `forward_features` directly) so ZeRO-3's hooks gather this module's own
        parameters (tokens, position table).
        """
        if isinstance(x, PackedBatch):
            if masks is not None or patch_tokens:
                raise ValueError("packed (NaViT) batches take no masks and return no patch tokens")
            return self.head(self.forward_packed(x)[1])
        if masks is None and not patch_tokens:
            return super().forward(x)
        feats = self.forward_features(x, masks=masks, mask_token=mask_token)
        pooled = self.head(self.pool(feats))
        return (pooled, feats[:, self.num_prefix_tokens :]) if patch_tokens else pooled

    def packed_tokens(self, batch: PackedBatch) -> torch.Tensor:
        """NaViT tokens (B, L, D) after the final norm; see `forward_packed`."""
        patches, coords, ids, grids, _ = batch
        w = self.patch_embed.proj.weight
        x = F.linear(patches.to(w.dtype), w.flatten(1), self.patch_embed.proj.bias)  # (B, L, D)

        # Position embedding per patch: resize once per distinct grid, then gather.
        grid_of_token = torch.gather(grids, 1, repeat(ids.clamp(min=0), "b l -> b l 2"))
        is_patch = coords[..., 0] >= 0
        pos = torch.zeros_like(x)
        for rows, cols in torch.unique(grids[grids[..., 0] > 0], dim=0).tolist():
            sel = is_patch & (grid_of_token == torch.tensor([rows, cols], device=ids.device)).all(
                -1
            )
            table = self.patch_pos_embed(rows, cols).to(x.dtype)
            pos[sel] = table[coords[sel][:, 0] * cols + coords[sel][:, 1]]
        x = x + pos
        if self.num_prefix_tokens:
            is_prefix = (ids >= 0) & ~is_patch
            prefix = self._prefix(1).to(x.dtype)  # (1, P, D)
            if self.num_prefix_tokens > 1:
                # Each image's prefix slots open its span, in order: slot k takes prefix token k.
                m = grids.shape[1]
                member = ids.unsqueeze(1) == torch.arange(m, device=ids.device).view(1, m, 1)
                start = torch.gather(member.float().argmax(dim=-1), 1, ids.clamp(min=0))  # (B, L)
                offset = torch.arange(ids.shape[1], device=ids.device) - start
                prefix = prefix[0, offset.clamp(0, self.num_prefix_tokens - 1)]  # (B, L, D)
            x = torch.where(is_prefix.unsqueeze(-1), prefix, x)

        # Block-diagonal attention: a token sees only its own image (padding sees padding).
        same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (B, L, L)
        x = run_blocks(self.blocks, x, self.grad_checkpointing, same.unsqueeze(1))
        return self.norm(x)

    def forward_packed(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """NaViT forward: returns tokens (B, L, D) and pooled features (num_images, D).

        Pooled features come in the caller's order (`batch.order`), not the packing order.
        """
        _, coords, ids, grids, order = batch
        x = self.packed_tokens(batch)
        is_patch = coords[..., 0] >= 0
        valid = grids[..., 0] > 0  # (B, M)
        m = grids.shape[1]
        member = ids.unsqueeze(1) == torch.arange(m, device=ids.device).view(1, m, 1)  # (B, M, L)
        if self.pool_type == "cls":
            first = member.float().argmax(dim=-1)  # the prefix slot opens each image's span
            pooled = torch.gather(x, 1, repeat(first, "b m -> b m d", d=x.shape[-1]))
        elif self.pool_type == "mean":
            weights = (member & is_patch.unsqueeze(1)).to(x.dtype)
            pooled = weights @ x / weights.sum(-1, keepdim=True).clamp(min=1)
        else:
            # Unused image slots attend everywhere so no row is fully masked; they are dropped.
            mask = member | ~valid.unsqueeze(-1)
            pooled = self.attn_pool(x, queries=m, attn_mask=mask)
        out = pooled.new_empty(int(valid.sum()), pooled.shape[-1])
        out[order[valid]] = pooled[valid]
        return x, out


def build_vit(size: str, patch_size: int, **overrides: object) -> VisionTransformer:
    """ViT of a named size ("tiny" ... "huge") and patch size; `overrides` go to the constructor."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; valid sizes: {', '.join(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[size]
    kwargs: dict[str, object] = dict(embed_dim=dim, depth=depth, num_heads=heads)
    kwargs.update(overrides)
    return VisionTransformer(patch_size=patch_size, **kwargs)  # type: ignore[arg-type]


def vit_builder(size: str, patch_size: int):
    """A registry entry: `build_vit` with size and patch fixed."""
    return partial(build_vit, size, patch_size)

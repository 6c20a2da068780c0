"""Masked image modelling: MAE proper on ViT, SimMIM-style on Swin / Twins-SVT, in one module.

`MAE` wraps any `Backbone` and asks it one question, `backbone.masking`:

- "drop" (ViT; He et al. 2021): the encoder runs on the visible patches only
  (`forward_features(x, keep=ids_keep)`); a light transformer decoder re-inserts a learned mask
  token at the hidden positions (unshuffle with `ids_restore`), adds fixed 2-D sin-cos position
  embeddings for the actual grid and predicts the pixels of every patch.
- "token" (Swin, Twins; Xie et al. 2022): the encoder sees the whole image with hidden stride-4
  patches replaced by its mask token (`forward_features(x, mask=...)`); a pixel head (one linear
  layer when `decoder_depth` is 0, as in SimMIM) maps each stride-32 feature to its 32x32 pixels.

Both families share the rest: masks are drawn per sample on a grid of mask units
(`mask_patch_size` pixels, default `backbone.mask_stride`: the ViT patch, or 32 for the
hierarchical backbones), exactly round(mask_ratio * units) of them hidden; predictions and targets
live in one patch layout (B, L, s*s*C) with s = `backbone.mask_stride`; the loss is the mean pixel
error over hidden pixels only.

NaViT (ViT only): `forward` on a `PackedBatch` runs `forward_packed`, MAE inside each packed image
(its own share of patches dropped, attention within the image in encoder and decoder, its own
loss), so that each image's loss is the one it gets alone; the batch loss is their mean.

Not here: optimisers, backward, device placement or anything distributed (see `pipeline/train/`),
and data augmentation. Randomness comes only from the `torch.Generator` passed to `forward`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from pipeline.config import MaeConfig
from pipeline.data.packing import PackedBatch, distinct_grids, select_tokens, token_grids
from pipeline.models.base import Backbone
from pipeline.models.vit import Block


class MaskSample(NamedTuple):
    """One batch of random masks over the backbone's patch grid (N = rows * cols patches).

    mask: (B, N) bool, True = hidden from the encoder.
    ids_keep: (B, K) long, the visible patches (what a "drop" encoder runs on).
    ids_restore: (B, N) long, inverse of the shuffle [visible..., hidden...] -> raster order.
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor


def sincos_pos_embed_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE): (rows * cols, dim), row-major, float32.

    The first half of the channels encodes the column, the second half the row, as in MAE's
    released code, each half as [sin, cos] of the coordinate at geometric frequencies.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (M, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, dim/2)

    ys, xs = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )
    return torch.cat([embed_1d(xs), embed_1d(ys)], dim=1).float()  # (rows * cols, dim)


class PixelDecoder(nn.Module):
    """Encoder width -> pixels per output cell: embed, [mask token], blocks, norm, prediction.

    With `depth` 0 it is one linear layer (SimMIM's 1x1-conv head) and has no mask token, no
    position embeddings and no norm. Position embeddings are fixed sin-cos tables, built per grid
    and device on first use and cached outside autograd and outside the state dict.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        mask_token: bool,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.dim = dim
        if depth == 0:
            self.embed: nn.Module = nn.Identity()
            self.mask_token = None
            self.blocks = nn.ModuleList()
            self.norm: nn.Module = nn.Identity()
            self.pred = nn.Linear(in_dim, out_dim)
        else:
            self.embed = nn.Linear(in_dim, dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
            self.blocks = nn.ModuleList(
                Block(dim, num_heads, mlp_ratio, drop_path=0.0, layer_scale_init=None)
                for _ in range(depth)
            )
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.pred = nn.Linear(dim, out_dim)
        self._pos_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE: xavier-uniform linears (qkv included), zero biases, unit norms, mask token N(0, .02).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def pos_embed(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """Cached fixed position table for a (rows, cols) grid: (rows * cols, dim), float32."""
        key = (rows, cols, device)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed_2d(self.dim, rows, cols).to(device)
        return self._pos_cache[key]

    def run(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks, norm and prediction over already-embedded tokens (B, T, dim) -> (B, T, out);
        `attn_mask` as `Attention`'s (packed rows: each token attends to its own image)."""
        for blk in self.blocks:
            x = blk(x) if attn_mask is None else blk(x, attn_mask)
        return self.pred(self.norm(x))


class MAE(nn.Module):
    """Masked-autoencoder objective around a backbone; see the module docstring.

    `forward(images, generator)` returns a dict:
        loss: scalar, mean pixel error over hidden pixels.
        logs: {"mask_ratio": share of mask units hidden (a Python float, no device sync)}.
        pred: "drop" -> (B, N, p*p*C) per patch (MAE layout); "token" -> (B, C, H, W) pixels.
            Both are in target space (per-patch normalised when `norm_pix_loss`).
        mask: (B, N) bool over the backbone's patch grid (row-major), True = hidden.
    """

    def __init__(self, backbone: Backbone, cfg: MaeConfig, in_chans: int = 3) -> None:
        super().__init__()
        if backbone.masking not in ("drop", "token"):
            raise ValueError(f"backbone masking {backbone.masking!r} is neither 'drop' nor 'token'")
        self.backbone = backbone
        self.cfg = cfg
        self.in_chans = in_chans
        # Predictions and targets are per output cell of the encoder: the ViT patch, or the
        # stride-32 cell of a hierarchical backbone. Mask units default to the same size.
        self.pred_patch = backbone.mask_stride
        self.mask_unit = cfg.mask_patch_size or backbone.mask_stride
        if self.mask_unit % backbone.patch_size:
            raise ValueError(
                f"method.mae.mask_patch_size={self.mask_unit} must be a multiple of the "
                f"backbone patch size {backbone.patch_size}"
            )
        self.input_multiple = math.lcm(self.mask_unit, backbone.mask_stride)
        drop = backbone.masking == "drop"
        if cfg.decoder_depth > 0 and cfg.decoder_dim % 4:
            raise ValueError(
                f"method.mae.decoder_dim={cfg.decoder_dim} must be divisible by 4 for the "
                "decoder's 2-D sin-cos position embeddings"
            )
        if drop and cfg.decoder_depth == 0:
            raise ValueError(
                "method.mae.decoder_depth=0 (a linear head) cannot predict patches the encoder "
                "dropped: a 'drop' backbone (ViT) needs decoder_depth >= 1"
            )
        self.decoder = PixelDecoder(
            in_dim=backbone.embed_dim,
            dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            out_dim=self.pred_patch**2 * in_chans,
            mask_token=drop,
        )

    # Layout helpers ------------------------------------------------------------------------

    @staticmethod
    def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
        """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), patches row-major, pixels (p q c) inside."""
        return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)

    @staticmethod
    def unpatchify(x: torch.Tensor, p: int, rows: int, cols: int) -> torch.Tensor:
        """Inverse of `patchify`: (B, rows * cols, p*p*C) -> (B, C, rows * p, cols * p)."""
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=rows, w=cols, p=p, q=p)

    @staticmethod
    def random_masking(
        batch: int,
        rows: int,
        cols: int,
        ratio: float,
        generator: torch.Generator | None,
        device: torch.device | str = "cpu",
        unit: int = 1,
    ) -> MaskSample:
        """Per-sample random masks over a (rows, cols) patch grid, in mask units of unit x unit.

        Exactly round(ratio * units) units are hidden in every sample (at least one, and at least
        one stays visible). As in MAE, samples are ranked by uniform noise and the lowest-noise
        units are kept; `unit` > 1 ranks whole blocks of patches so they are kept or hidden
        together (SimMIM's 32-pixel mask units over stride-4 patches). `generator` None draws
        from torch's default generator for `device`; the engine always passes one.
        """
        if rows % unit or cols % unit:
            raise ValueError(f"patch grid {rows}x{cols} is not divisible by the mask unit {unit}")
        units = (rows // unit) * (cols // unit)
        if units < 2:
            raise ValueError(f"a {rows}x{cols} patch grid holds {units} mask unit; need >= 2")
        n_hidden = min(max(round(ratio * units), 1), units - 1)
        noise = torch.rand(batch, units, generator=generator, device=device)  # (B, U)
        # Ranks rather than noise, so ties cannot split a unit across the keep/hide boundary.
        rank = noise.argsort(dim=1).argsort(dim=1)  # (B, U): 0 = kept first
        rank = repeat(
            rank,
            "b (h w) -> b (h i) (w j)",
            h=rows // unit,
            i=unit,
            j=unit,
        )
        ids_shuffle = rank.flatten(1).argsort(dim=1, stable=True)  # (B, N), visible first
        ids_restore = ids_shuffle.argsort(dim=1)  # (B, N)
        len_keep = (units - n_hidden) * unit * unit
        mask = ids_restore >= len_keep  # (B, N): True where the shuffle put it past the kept
        return MaskSample(mask, ids_shuffle[:, :len_keep], ids_restore)

    # Encoder / decoder ---------------------------------------------------------------------

    def forward_encoder(self, images: torch.Tensor, masks: MaskSample) -> torch.Tensor:
        """Visible tokens (B, prefix + K, D) for "drop"; masked feature map (B, h, w, D) else."""
        if self.backbone.masking == "drop":
            return self.backbone.forward_features(images, keep=masks.ids_keep)
        rows, cols = self.backbone.grid_size(*images.shape[-2:])
        grid_mask = rearrange(masks.mask, "b (h w) -> b h w", h=rows, w=cols)
        return self.backbone.forward_features(images, mask=grid_mask)

    def forward_decoder(
        self, latent: torch.Tensor, masks: MaskSample, out_grid: tuple[int, int]
    ) -> torch.Tensor:
        """Encoder output -> predictions (B, L, s*s*C) over the (rows, cols) output grid."""
        dec = self.decoder
        rows, cols = out_grid
        if self.backbone.masking == "token":
            if (latent.shape[1], latent.shape[2]) != out_grid:
                raise RuntimeError(f"feature map {tuple(latent.shape[1:3])} is not {out_grid}")
            x = rearrange(latent, "b h w d -> b (h w) d")
            x = dec.embed(x)  # (B, L, dim)
            if dec.depth > 0:
                x = x + dec.pos_embed(rows, cols, x.device).to(x.dtype)
            return dec.run(x)

        # Tokens before the patches (cls); not part of the `Backbone` contract, so default 0.
        prefix = getattr(self.backbone, "num_prefix_tokens", 0)
        x = dec.embed(latent)  # (B, prefix + K, dim)
        b, n = masks.ids_restore.shape
        fill = dec.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - prefix), -1)
        x_ = torch.cat([x[:, prefix:], fill], dim=1)  # (B, N, dim) in shuffled order
        x_ = torch.gather(x_, 1, repeat(masks.ids_restore, "b n -> b n d", d=x.shape[-1]))
        x_ = x_ + dec.pos_embed(rows, cols, x.device).to(x.dtype)  # raster order now
        # The prefix (cls) token goes through the decoder with a zero position, as in MAE.
        x = dec.run(torch.cat([x[:, :prefix], x_], dim=1))  # (B, prefix + N, out)
        return x[:, prefix:]

    # Loss ----------------------------------------------------------------------------------

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels per output cell (B, L, s*s*C) in float32; per-cell normalised if norm_pix."""
        return self.cell_target(self.patchify(images.float(), self.pred_patch))

    def cell_target(self, target: torch.Tensor) -> torch.Tensor:
        """float32 pixels per output cell (..., s*s*C) -> the target: per-cell normalised if
        norm_pix."""
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def loss_weights(self, mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Patch-grid mask (B, N) -> 0/1 weights per predicted value (B, L, s*s*C), float32.

        rows, cols: the backbone's patch grid. Each patch-grid cell covers patch_size^2 pixels
        and every channel; the layout matches `patchify(images, s)`.
        """
        r = self.pred_patch // self.backbone.patch_size  # patch cells per output cell side
        a = self.backbone.patch_size
        grid = rearrange(mask.float(), "b (h w) -> b h w", h=rows, w=cols)
        # An output cell's pixel row is (i y): patch cell i, pixel y inside it; likewise (j x).
        return repeat(
            grid, "b (h i) (w j) -> b (h w) (i y j x c)", i=r, j=r, y=a, x=a, c=self.in_chans
        )

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Mean l2 (or l1) error over the values whose weight is 1 (the hidden pixels).

        For "drop" backbones this equals MAE's per-patch mean over hidden patches; for "token"
        backbones SimMIM's sum over hidden pixels / (hidden pixels * channels).
        """
        pred = pred.float()
        if self.cfg.loss == "l1":
            err = F.l1_loss(pred, target, reduction="none")
        else:
            err = F.mse_loss(pred, target, reduction="none")
        weight = torch.broadcast_to(weight, err.shape)
        return (err * weight).sum() / weight.sum()

    # Entry point ---------------------------------------------------------------------------

    def check_input(self, images: torch.Tensor) -> None:
        """Raise a ValueError unless images are (B, in_chans, H, W) with sides the mask fits."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"MAE expects a (B, {self.in_chans}, H, W) batch, got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        m = self.input_multiple
        if h % m or w % m:
            raise ValueError(
                f"MAE: input {h}x{w} must have sides divisible by {m} (mask unit "
                f"{self.mask_unit} px, output stride {self.backbone.mask_stride} px); crop or "
                "resize the images, or change method.mae.mask_patch_size"
            )

    def forward(
        self, images: torch.Tensor | PackedBatch, generator: torch.Generator | None = None
    ) -> dict[str, object]:
        """images (B, C, H, W) normalised floats -> {"loss", "logs", "pred", "mask"}.

        `generator` (on the images' device) draws the masks; None uses torch's default one.
        A `PackedBatch` goes to `forward_packed`.
        """
        if isinstance(images, PackedBatch):
            return self.forward_packed(images, generator)
        self.check_input(images)
        b, _, h, w = images.shape
        rows, cols = self.backbone.grid_size(h, w)
        unit = self.mask_unit // self.backbone.patch_size
        masks = self.random_masking(
            b, rows, cols, self.cfg.mask_ratio, generator, images.device, unit
        )
        s = self.pred_patch
        out_grid = (h // s, w // s)

        latent = self.forward_encoder(images, masks)
        pred = self.forward_decoder(latent, masks, out_grid)  # (B, L, s*s*C)
        loss = self.loss(pred, self.target(images), self.loss_weights(masks.mask, rows, cols))

        hidden_share = 1.0 - masks.ids_keep.shape[1] / (rows * cols)
        if self.backbone.masking == "token":
            pred = self.unpatchify(pred, s, *out_grid)  # (B, C, H, W)
        return {
            "loss": loss,
            "logs": {"mask_ratio": hidden_share},
            "pred": pred,
            "mask": masks.mask,
        }

    # NaViT: packed images of mixed sizes -----------------------------------------------------

    def packed_masking(self, batch: PackedBatch, generator: torch.Generator | None) -> torch.Tensor:
        """(B, L) bool, True = hidden: per image of N patches, exactly as `random_masking` hides
        them in an image of its own (round(mask_ratio * N), at least one, at least one visible;
        the lowest-noise patches kept), with the noise drawn once for the whole packed batch."""
        _, coords, ids, grids, _ = batch
        if self.mask_unit != self.backbone.patch_size:
            raise ValueError(
                f"method.mae.mask_patch_size={self.mask_unit} does not apply to packed (NaViT) "
                f"batches: their images mask single {self.backbone.patch_size}-pixel patches"
            )
        sizes = grids.prod(dim=-1)  # (B, M) patches per image, 0 for unused slots
        if bool(((sizes > 0) & (sizes < 2)).any()):
            raise ValueError("a packed image of a single patch cannot be masked; need >= 2")
        hidden = (sizes * self.cfg.mask_ratio).round().long().clamp(min=1)
        keep = sizes - torch.minimum(hidden, sizes - 1)  # (B, M) patches kept per image
        is_patch = coords[..., 0] >= 0
        noise = torch.rand(ids.shape, generator=generator, device=ids.device)
        # Sort each row by (image, noise): every image's patches become one run, lowest noise
        # first; a patch's rank in its image is its place in the run.
        key = torch.where(is_patch, ids.double() + noise.double(), math.inf)
        by_key = key.argsort(dim=1, stable=True)
        start = sizes.cumsum(dim=1) - sizes  # (B, M) where each image's run begins
        run_start = start.gather(1, ids.gather(1, by_key).clamp(min=0))
        rank_sorted = torch.arange(ids.shape[1], device=ids.device) - run_start
        rank = torch.empty_like(rank_sorted).scatter_(1, by_key, rank_sorted)
        return is_patch & (rank >= keep.gather(1, ids.clamp(min=0)))

    def forward_packed(
        self,
        batch: PackedBatch,
        generator: torch.Generator | None = None,
        hidden: torch.Tensor | None = None,
    ) -> dict[str, object]:
        """MAE on a `PackedBatch` of normalised patches (NaViT): each image loses a share of its
        own patches (`packed_masking`, or `hidden` (B, L) when given), the encoder runs on the
        rest (`select_tokens`), the decoder on every slot with attention inside each image, and
        each image's loss is its mean error over its hidden patches, as `forward` gives an image
        alone. Returns {"loss" (the mean over images), "logs", "pred" (B, L, p*p*C), "mask"
        (B, L), "per_image" (num_images,) in the caller's order}."""
        if self.backbone.masking != "drop":
            raise ValueError("packed (NaViT) batches need a ViT ('drop' masking) backbone")
        if hidden is None:
            hidden = self.packed_masking(batch, generator)
        patches, coords, ids, grids, order = batch
        keep = (ids >= 0) & ~hidden  # prefix tokens and visible patches
        latent = self.backbone.packed_tokens(select_tokens(batch, keep))  # (B, L', D)

        dec = self.decoder
        x = dec.embed(latent)
        # Back to the full layout: kept slot l is at keep[:, :l].sum() in the encoder's rows.
        at = (keep.cumsum(dim=1) - 1).clamp(min=0)
        x = torch.gather(x, 1, repeat(at, "b l -> b l d", d=x.shape[-1]))
        x = torch.where(keep.unsqueeze(-1), x, dec.mask_token.to(x.dtype))
        # Position per patch of its own image's grid; the prefix (cls) gets zero, as in MAE.
        is_patch = coords[..., 0] >= 0
        grid_of_token = token_grids(batch)
        pos = torch.zeros_like(x)
        for rows, cols in distinct_grids(batch):
            sel = is_patch & (grid_of_token == grid_of_token.new_tensor([rows, cols])).all(-1)
            table = dec.pos_embed(rows, cols, x.device).to(x.dtype)
            pos[sel] = table[coords[sel][:, 0] * cols + coords[sel][:, 1]]
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).unsqueeze(1)  # (B, 1, L, L)
        pred = dec.run(x + pos, same)  # (B, L, p*p*C)

        # Packed patches are (c p q); predictions and targets are (p q c), as `patchify`.
        s = self.pred_patch
        pixels = rearrange(patches.float(), "b l (c p q) -> b l (p q c)", p=s, q=s)
        target = self.cell_target(pixels)
        if self.cfg.loss == "l1":
            err = F.l1_loss(pred.float(), target, reduction="none")
        else:
            err = F.mse_loss(pred.float(), target, reduction="none")
        m = grids.shape[1]
        member = ids.unsqueeze(1) == torch.arange(m, device=ids.device).view(1, m, 1)  # (B, M, L)
        member = (member & hidden.unsqueeze(1)).float()
        per_slot = (member @ err.mean(dim=-1, keepdim=True)).squeeze(-1)  # (B, M) error sums
        per_slot = per_slot / member.sum(dim=-1).clamp(min=1)
        valid = grids[..., 0] > 0
        per_image = per_slot.new_empty(int(valid.sum()))
        per_image[order[valid]] = per_slot[valid]
        hidden_share = float(hidden.sum()) / max(int(is_patch.sum()), 1)
        return {
            "loss": per_image.mean(),
            "logs": {"mask_ratio": hidden_share},
            "pred": pred,
            "mask": hidden,
            "per_image": per_image,
        }

    def no_weight_decay(self) -> set[str]:
        """Names (as in this module's `named_parameters()`) that take no weight decay."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        for name, p in self.decoder.named_parameters():
            # ZeRO-3 partitions parameters to shape (0,): read the real shape from `ds_shape`.
            if len(getattr(p, "ds_shape", p.shape)) <= 1 or "mask_token" in name:
                names.add(f"decoder.{name}")
        return names

"""The one contract every backbone (ViT, Swin, Twins-SVT) keeps.

Methods and evaluation code talk to backbones only through this interface, never through
`isinstance` checks: `masking` tells MAE whether to drop hidden patches (ViT) or to replace them by
a mask token (hierarchical backbones, SimMIM style).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement `forward_features` and `pool`.

    Attributes:
        embed_dim: width of the pooled embedding (and of the final tokens / feature map).
        patch_size: input sides must be multiples of this.
        mask_stride: stride of the coarsest feature grid; masked-pretraining masks live on it.
        masking: "drop" (forward over kept token indices) or "token" (mask-token input).
        num_classes: classifier outputs, 0 for none.
    """

    embed_dim: int
    patch_size: int
    mask_stride: int
    masking: Literal["drop", "token"]
    num_classes: int
    grad_checkpointing: bool = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens (B, T, D) for ViT, a channels-last feature map (B, H, W, D) otherwise."""
        raise NotImplementedError

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, D) from `forward_features` output."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding, or class logits when the backbone was built with `num_classes`."""
        return self.head(self.pool(self.forward_features(x)))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input of this size."""
        return height // self.patch_size, width // self.patch_size

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay: norms, biases, tokens, position tables."""
        # ZeRO-3 partitions parameters to shape (0,): read the real shape from `ds_shape`.
        return {
            name
            for name, p in self.named_parameters()
            if len(getattr(p, "ds_shape", p.shape)) <= 1
            or any(k in name for k in self.no_weight_decay_keywords)
        }

    no_weight_decay_keywords: tuple[str, ...] = ()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of keeping them."""
        self.grad_checkpointing = enable


def make_head(embed_dim: int, num_classes: int) -> nn.Module:
    """Linear classifier or identity; zero-initialised as in DeiT/Swin fine-tuning."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(embed_dim, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head

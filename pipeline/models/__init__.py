"""Backbones: ViT (with NaViT packing), Swin and Twins-SVT behind one `Backbone` contract.

`build_backbone(name, **overrides)` is the only way the rest of the pipeline makes a backbone;
the name table is `pipeline.models.registry.BACKBONES`.
"""

from torch import nn

from pipeline.models.base import Backbone
from pipeline.models.registry import BACKBONES, build_backbone
from pipeline.models.swin import SwinBlock
from pipeline.models.twins import TwinsBlock
from pipeline.models.vit import Block

# The repeated units `compile_blocks` compiles: one graph each, reused by every block of a model.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block, SwinBlock, TwinsBlock)


def compile_blocks(module: nn.Module) -> int:
    """`torch.compile` every transformer block inside `module` (ViT, Swin, Twins, the MAE
    decoder's), in place: parameter names and the state dict are unchanged. Returns how many."""
    blocks = [m for m in module.modules() if isinstance(m, BLOCK_TYPES)]
    for block in blocks:
        block.compile()
    return len(blocks)


__all__ = ["BACKBONES", "BLOCK_TYPES", "Backbone", "build_backbone", "compile_blocks"]

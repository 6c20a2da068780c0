"""Backbones: ViT (with NaViT packing), Swin and Twins-SVT behind one `Backbone` contract.

`build_backbone(name, **overrides)` is the only way the rest of the pipeline makes a backbone;
the name table is `pipeline.models.registry.BACKBONES`.
"""

from pipeline.models.base import Backbone
from pipeline.models.registry import BACKBONES, build_backbone

__all__ = ["BACKBONES", "Backbone", "build_backbone"]

"""Backbone names -> builders, as one literal table, so each name is one grep away."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

from pipeline.models.base import Backbone
from pipeline.models.swin import build_swin
from pipeline.models.twins import build_twins
from pipeline.models.vit import build_vit

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "vit_tiny_patch4": partial(build_vit, "tiny", 4),  # small images (32 px: the quickstart)
    "vit_tiny_patch8": partial(build_vit, "tiny", 8),
    "vit_tiny_patch14": partial(build_vit, "tiny", 14),
    "vit_tiny_patch16": partial(build_vit, "tiny", 16),
    "vit_small_patch8": partial(build_vit, "small", 8),
    "vit_small_patch14": partial(build_vit, "small", 14),
    "vit_small_patch16": partial(build_vit, "small", 16),
    "vit_base_patch8": partial(build_vit, "base", 8),
    "vit_base_patch14": partial(build_vit, "base", 14),
    "vit_base_patch16": partial(build_vit, "base", 16),
    "vit_large_patch8": partial(build_vit, "large", 8),
    "vit_large_patch14": partial(build_vit, "large", 14),
    "vit_large_patch16": partial(build_vit, "large", 16),
    "vit_huge_patch8": partial(build_vit, "huge", 8),
    "vit_huge_patch14": partial(build_vit, "huge", 14),
    "vit_huge_patch16": partial(build_vit, "huge", 16),
    "swin_tiny": partial(build_swin, "tiny"),
    "swin_small": partial(build_swin, "small"),
    "swin_base": partial(build_swin, "base"),
    "swin_large": partial(build_swin, "large"),
    "twins_svt_small": partial(build_twins, "small"),
    "twins_svt_base": partial(build_twins, "base"),
    "twins_svt_large": partial(build_twins, "large"),
}


def build_backbone(name: str, **overrides: object) -> Backbone:
    """Build the named backbone; `overrides` (e.g. `num_classes=1000`, `drop_path_rate=0.1`,
    `depth=4` for tiny test models) go to its constructor."""
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, BACKBONES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}{hint} (known: {', '.join(BACKBONES)})")
    return BACKBONES[name](**overrides)

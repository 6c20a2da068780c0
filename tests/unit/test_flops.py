"""Model FLOPs: the ViT formula against torch's FlopCounterMode, and whole-method step counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_recipe
from pipeline.models import build_backbone
from pipeline.train.flops import method_step_flops, peak_tflops, traced_flops, vit_forward_flops

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize(
    ("name", "size", "overrides"),
    [
        ("vit_small_patch16", 224, {}),
        ("vit_small_patch16", 96, {}),
        ("vit_base_patch16", 224, {}),
        ("vit_tiny_patch8", 32, {"embed_dim": 64, "depth": 3, "num_heads": 4}),
    ],
)
def test_vit_formula_equals_the_flop_counter(name, size, overrides):
    with torch.device("meta"):
        model = build_backbone(name, **overrides)

    def batch(b: int) -> int:
        x = torch.empty(b, 3, size, size, device="meta")
        return traced_flops(lambda: model.forward_features(x))

    # Per image: the difference of two batch sizes leaves out the once-per-batch resize of the
    # position embeddings to a grid other than the native one.
    counted = batch(3) - batch(2)
    patches = (size // model.patch_size) ** 2
    blocks = len(model.blocks)
    hidden = model.blocks[0].mlp.fc1.out_features
    formula = vit_forward_flops(patches=patches, prefix=model.num_prefix_tokens,
                                dim=model.embed_dim, depth=blocks, mlp_hidden=hidden,
                                patch=model.patch_size)  # fmt: skip
    assert formula == counted


def test_method_step_flops_match_the_published_sizes():
    dino = method_step_flops(load_recipe(RECIPES / "dino_vits16.yaml"))
    # 2x224 + 10x96 on ViT-S/16: 122 GFLOP for the backbones, plus the DINO heads.
    assert 122e9 < dino < 126e9
    mae = method_step_flops(load_recipe(RECIPES / "mae_vitb16.yaml"))
    encoder = vit_forward_flops(patches=49, prefix=1, dim=768, depth=12, mlp_hidden=3072,
                                patch=16)  # fmt: skip
    # The encoder on the 49 visible patches plus the 8-block decoder on all 196, times 3.
    assert 3 * encoder < mae < 9 * encoder


def test_peak_table_knows_the_h200():
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("cpu") is None

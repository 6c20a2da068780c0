"""Which weights the evaluation stages measure."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.config import load_recipe
from pipeline.models import build_backbone
from pipeline.stages import evaluated_backbone

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "debug" / "dino_tiny.yaml"


def test_a_run_without_checkpoints_evaluates_model_init_from(tmp_path):
    torch.manual_seed(3)
    source = build_backbone("vit_tiny_patch8", embed_dim=64, depth=4, num_heads=4)
    weights = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    config = '{"contents": "backbone", "backbone": "vit_tiny_patch8", "kwargs": '
    config += '{"embed_dim": 64, "depth": 4, "num_heads": 4}, "method": "dino"}'
    (tmp_path / "bb.json").write_text(config)
    recipe = load_recipe(RECIPE, [f"model.init_from={weights}", "stages=[finetune]"])
    backbone = evaluated_backbone(recipe, tmp_path / "fresh_run")
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key

"""The evaluation baselines: raw pixels as a backbone stand-in, and the recipe keys."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import load_recipe
from pipeline.eval.features import FeatureSet, PixelFeatures, image_features
from pipeline.eval.linear import Standardizer, feature_choices

ROOT = Path(__file__).resolve().parents[2]


def test_pixels_are_the_crop_downsampled_to_at_most_4096_values() -> None:
    pixels = PixelFeatures()
    small = torch.randn(2, 3, 32, 32)
    out = image_features(pixels, small)
    assert torch.equal(out["pooled"], small.flatten(1)) and out["avg"].shape == (2, 0)
    big = torch.randn(2, 3, 224, 160)
    pooled = image_features(pixels, big)["pooled"]
    assert 3000 < pooled.shape[1] <= 4096  # area-averaged, aspect kept (43 x 31 x 3)
    assert torch.allclose(pooled.mean(), big.mean(), atol=1e-2)


def test_pixel_features_give_one_probe_input_and_a_safe_scale() -> None:
    x = torch.rand(6, 12)
    x[:, 0] = 0.0  # a border pixel that is black in every training image
    feats = FeatureSet(ids=torch.arange(6), labels=torch.arange(6) % 2, pooled=x, avg=x[:, :0])
    assert [c.name for c in feature_choices(feats)] == ["pooled"]
    std = Standardizer.fit(feats)
    test = FeatureSet(ids=torch.arange(1), labels=torch.zeros(1, dtype=torch.long),
                      pooled=torch.full((1, 12), 0.5), avg=torch.zeros(1, 0))  # fmt: skip
    inputs = std.inputs(test, feature_choices(feats), torch.device("cpu"))["pooled"]
    assert inputs[0, 0] == 0.5  # std 1 on a constant dimension, not 1e-6: no blow-up


def test_baseline_keys_and_older_run_directories() -> None:
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml")
    assert recipe.eval.baselines == ["random_init", "pixels"]
    assert "logreg" in recipe.stages and "finetune" in recipe.stages
    older = load_recipe(ROOT / "recipes/quickstart.yaml", ["eval.random_baseline=false"])
    assert older.eval.baselines == ["pixels"]

"""The loader's warning when a recipe's crops enlarge small stored images (one per process)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.config import load_recipe
from pipeline.data import loader
from pipeline.data.digits import write_digits_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train, _ = write_digits_shards(tmp_path_factory.mktemp("digits"), size=32)
    return train


def test_mae_at_224_on_32_pixel_images_warns_once(digits: Path, caplog) -> None:
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", [f"data.train.shards={digits}"])
    assert loader.stored_side(str(digits)) == pytest.approx(32.0)
    loader._warned_upsample.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        loader.warn_if_upsampling(recipe.data, "dino")  # 32-px crops of 32-px images: fine
        assert not caplog.records
        loader._warned_upsample.clear()
        big = load_recipe(ROOT / "recipes/quickstart.yaml",
                          [f"data.train.shards={digits}", "data.crops.mae_size=224"])  # fmt: skip
        loader.warn_if_upsampling(big.data, "mae")
        loader.warn_if_upsampling(big.data, "mae")
    assert len(caplog.records) == 1
    assert "data.crops.mae_size=224" in caplog.text and "8.4x on average" in caplog.text

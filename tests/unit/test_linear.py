"""Linear probe and the features it reads, on synthetic tensors and a tiny ViT (one process)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import LinearConfig
from pipeline.eval.features import FeatureSet, extract_features, image_features, make_accelerator
from pipeline.eval.linear import (
    Standardizer,
    _pick,
    feature_choices,
    few_shot_rows,
    input_dim,
    split_train_val,
    train_heads,
)
from pipeline.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(**kw):
    torch.manual_seed(0)
    return build_backbone("vit_tiny_patch8", embed_dim=32, depth=3, num_heads=2, **kw).eval()


# --------------------------------------------------------------------------- splits


def test_held_out_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 1)
    train, val = split_train_val(labels, 0.1, seed=3)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(71))
    assert torch.bincount(labels[val], minlength=3).tolist() == [5, 2, 0]  # a lone image stays
    again = split_train_val(labels, 0.1, seed=3)
    assert torch.equal(val, again[1])
    assert not torch.equal(val, split_train_val(labels, 0.1, seed=4)[1])


def test_few_shot_takes_n_per_class():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    rows = few_shot_rows(labels, 4, seed=0)
    assert torch.bincount(labels[rows]).tolist() == [4, 3, 4]
    assert rows.tolist() == sorted(set(rows.tolist()))


# --------------------------------------------------------------------------- features


def test_image_features_of_a_vit_tap_the_last_blocks():
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 24)
    f = image_features(vit, x, n_last_blocks=2)
    tokens = vit.forward_features(x)
    assert f["cls"].shape == (2, 2, 32)
    torch.testing.assert_close(f["cls"][:, -1], f["pooled"])  # cls pooling = last class token
    torch.testing.assert_close(f["avg"], tokens[:, 1:].mean(1))
    assert not any(h for b in vit.blocks for h in b._forward_hooks.values())  # hooks removed
    no_cls = tiny_vit(class_token=False, pool="mean")
    g = image_features(no_cls, x)
    assert "cls" not in g
    torch.testing.assert_close(g["avg"], g["pooled"])


def test_extraction_orders_by_id_and_drops_padding_repeats():
    vit = tiny_vit()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)

    def batch(ids: list[int]) -> dict:
        rows = [i if i >= 0 else 0 for i in ids]  # a padding repeat re-sends image 0
        return {
            "views": [images[rows]],
            "label": torch.tensor([r % 3 for r in rows]),
            "id": torch.tensor(ids),
        }

    loader = [batch([4, 1, 5]), batch([0, 3, 2]), batch([-1])]
    acc = make_accelerator()
    fs = extract_features(vit, loader, acc, mean=(0.5,) * 3, std=(0.25,) * 3, n_last_blocks=2)
    assert fs.ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert fs.labels.tolist() == [0, 1, 2, 0, 1, 2]
    x = (images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(fs.pooled, vit(x), atol=1e-5, rtol=1e-5)
    assert fs.cls.dtype == torch.float16 and fs.cls.shape == (6, 2, 32)
    assert vit.training is False


# --------------------------------------------------------------------------- heads


def _feature_set(
    n: int, classes: int, dim: int, seed: int, with_cls: bool, draw: int = 0
) -> FeatureSet:
    """Class centres from `seed`; samples around them from (`seed`, `draw`)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 1000 + draw + 1)
    labels = torch.randint(0, classes, (n,), generator=g)
    pooled = 5 * centres[labels] + torch.randn(n, dim, generator=g) + 7.0  # offset: standardised
    cls = torch.stack([torch.randn(n, dim, generator=g), pooled], 1).half() if with_cls else None
    return FeatureSet(
        ids=torch.arange(n),
        labels=labels,
        pooled=pooled,
        avg=torch.randn(n, dim, generator=g),  # noise: heads on it alone learn nothing
        cls=cls,
    )


def test_feature_choices_and_input_dims():
    with_cls = _feature_set(10, 2, 4, 0, with_cls=True)
    names = [c.name for c in feature_choices(with_cls)]
    assert names == ["cls1", "cls1+avg", "cls2", "cls2+avg"]
    assert [input_dim(with_cls, c) for c in feature_choices(with_cls)] == [4, 8, 8, 12]
    std = Standardizer.fit(with_cls)
    inputs = std.inputs(with_cls, feature_choices(with_cls), torch.device("cpu"))
    assert inputs["cls2+avg"].shape == (10, 12)
    # cls2 = [block -2, block -1]: the last block comes last; standardised to mean 0 / std 1.
    torch.testing.assert_close(inputs["cls1"], inputs["cls2"][:, 4:])
    assert inputs["cls1"].mean(0).abs().max() < 1e-4
    without = _feature_set(10, 2, 4, 0, with_cls=False)
    assert [c.name for c in feature_choices(without)] == ["pooled", "avg"]


def test_heads_train_together_and_the_best_is_picked_on_the_held_out_split():
    data = _feature_set(600, 4, 8, 0, with_cls=False)
    train_rows, val_rows = split_train_val(data.labels, 0.2, seed=0)
    train, val = data.select(train_rows), data.select(val_rows)
    test = _feature_set(200, 4, 8, 0, with_cls=False, draw=1)  # a fresh draw of the same task
    cfg = LinearConfig(lrs=[1e-4, 0.1], epochs=3, batch_size=64)
    scores = train_heads(
        train, {"val": val, "test": test}, cfg, make_accelerator(), num_classes=4, seed=0
    )
    assert set(scores["val"]) == {"pooled_lr0.0001", "pooled_lr0.1", "avg_lr0.0001", "avg_lr0.1"}
    assert scores["val"]["pooled_lr0.1"][0] > 90
    assert scores["val"]["avg_lr0.1"][0] < 50  # noise features stay near chance
    picked = _pick(scores, "")
    assert picked["linear_best_head"] == "pooled_lr0.1"
    assert picked["linear_top1"] == scores["test"]["pooled_lr0.1"][0] > 90
    assert set(picked["linear_heads"]) == set(scores["val"])


def test_few_shot_heads_train_on_tiny_sets():
    data = _feature_set(200, 4, 8, 1, with_cls=True)
    subset = data.select(few_shot_rows(data.labels, 2, seed=0))  # 8 rows, batch > set size
    cfg = LinearConfig(lrs=[0.1], epochs=5, batch_size=256)
    scores = train_heads(subset, {"val": data}, cfg, make_accelerator(), num_classes=4, seed=0)
    assert all(0 <= top1 <= top5 <= 100 for top1, top5 in scores["val"].values())

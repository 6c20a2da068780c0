"""The quickstart digits dataset (`pipeline.data.digits`): split, upscaling, shards, idempotence.

Shards are written from a small stand-in for `load_digits` (3 images per class) so the test stays
fast; the split is checked on the real labels.
"""

from __future__ import annotations

import io
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from pipeline.data.digits import CLASSES, split_indices, upscale, write_digits_shards
from pipeline.data.shards import load_manifest


def fake_digits(per_class: int = 3) -> SimpleNamespace:
    """`load_digits`-shaped data: image i of class c is constant (c + 1) with a bright pixel."""
    target = np.repeat(np.arange(10), per_class)
    images = np.zeros((len(target), 8, 8))
    for i, c in enumerate(target):
        images[i] = c + 1
        images[i, i % 8, 0] = 16.0
    return SimpleNamespace(images=images, target=target)


def read_shards(folder) -> list[tuple[Image.Image, int]]:
    """(image, label) of every sample in a shard folder, in shard order."""
    manifest = load_manifest(folder)
    out = []
    for shard in manifest.shards:
        with tarfile.open(manifest.path(shard)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".png")):
            key = name.removesuffix(".png")
            image = Image.open(io.BytesIO(members[name]))
            image.load()
            out.append((image, int(members[f"{key}.cls"])))
    return out


def test_split_is_stratified_disjoint_and_seeded():
    labels = sklearn.datasets.load_digits().target
    train, val = split_indices(labels, 0.2, seed=0)
    assert len(train) + len(val) == len(labels) == 1797
    assert not set(train) & set(val)
    for c in range(10):
        assert (labels[val] == c).sum() == round(0.2 * (labels == c).sum())
    again = split_indices(labels, 0.2, seed=0)
    other = split_indices(labels, 0.2, seed=1)
    assert np.array_equal(again[1], val) and not np.array_equal(other[1], val)
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(labels, 1.0, seed=0)


def test_upscale_is_rgb_bright_ink_on_black():
    digit = np.zeros((8, 8))
    digit[2:6, 3:5] = 16.0
    image = upscale(digit, 32)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[16, 16].tolist() == [255, 255, 255]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_writes_labelled_shards_once(tmp_path, monkeypatch):
    data = fake_digits()
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: data)
    train_dir, val_dir = write_digits_shards(tmp_path / "digits", size=16, val_fraction=1 / 3)

    assert (train_dir, val_dir) == (tmp_path / "digits" / "train", tmp_path / "digits" / "val")
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["train", "val"]
    for folder, per_class in ((train_dir, 2), (val_dir, 1)):
        assert load_manifest(folder).classes == CLASSES
        samples = read_shards(folder)
        assert len(samples) == 10 * per_class
        assert sorted(label for _, label in samples) == sorted(list(range(10)) * per_class)
        for image, label in samples:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (16, 16)
            # Class folder "c" holds the images of digit c (label index == class name).
            level = round((label + 1) * 255 / 16)
            assert np.median(np.asarray(image)) == pytest.approx(level, abs=1)

    # Idempotent: with both manifests present nothing is loaded or rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: pytest.fail("loaded again"))
    assert write_digits_shards(tmp_path / "digits", size=16, val_fraction=1 / 3) == (
        train_dir,
        val_dir,
    )
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps

"""The quickstart dataset: scikit-learn's handwritten digits, written as labelled shards.

`sklearn.datasets.load_digits` ships inside the scikit-learn package (no download): 1797 grey
8x8 images of the digits 0-9, pixel values 0..16. `write_digits_shards` splits them per class into
train and val with a seeded permutation, upscales each image (bilinear) to `size` x `size` RGB
PNG, bright ink on black, writes them into a class-per-folder tree (class names "0".."9") and turns
each split into shards with `pipeline.data.shards.write_shards`.

It deliberately does not augment, normalise or load: the shards are read like any other dataset.
scikit-learn is imported only when the shards are actually written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.shards import MANIFEST_NAME, write_shards

CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
_SOURCE = "source"  # the temporary PNG tree inside out_dir; removed once both splits are written
_SHARD_SIZE = 100  # ~15 train shards: enough for 2 ranks x a few loader workers to share


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified (train, val) index arrays, sorted: round(val_fraction x n_c) of each class to
    val, picked by a permutation seeded with `seed`."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(val_fraction * len(members))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def upscale(image: np.ndarray, size: int) -> Image.Image:
    """An (8, 8) digit with values 0..16 -> a `size` x `size` RGB image (bilinear, 0..255)."""
    grey = np.clip(np.rint(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    small = Image.fromarray(grey)  # 2-D uint8 -> mode "L"
    return small.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def write_digits_shards(
    out_dir: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Path, Path]:
    """Write `out_dir/train` and `out_dir/val` shard folders of the digits; return both paths.

    Idempotent: when both folders already hold a manifest, nothing is read or written (delete
    `out_dir` to change `size`, `val_fraction` or `seed`). An interrupted call resumes: the PNG
    tree is rewritten byte for byte at the same place and `write_shards` keeps finished shards.
    """
    out_dir = Path(out_dir)
    train_dir, val_dir = out_dir / "train", out_dir / "val"
    if (train_dir / MANIFEST_NAME).is_file() and (val_dir / MANIFEST_NAME).is_file():
        return train_dir, val_dir
    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    from sklearn.datasets import load_digits  # a dependency of this dataset only

    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) float 0..16, (1797,)
    source = out_dir / _SOURCE
    for split, indices in zip(
        ("train", "val"), split_indices(labels, val_fraction, seed), strict=True
    ):
        for c in CLASSES:
            (source / split / c).mkdir(parents=True, exist_ok=True)
        for i in indices:
            # The dataset index names the file, so a sample can be traced back to load_digits.
            upscale(images[i], size).save(source / split / str(labels[i]) / f"{i:04d}.png")
    for split, out in (("train", train_dir), ("val", val_dir)):
        write_shards(source / split, out, shard_size=_SHARD_SIZE, seed=seed, progress=False)
    shutil.rmtree(source)
    return train_dir, val_dir

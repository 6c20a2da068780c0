"""Fixtures shared by every test tier."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> Callable[..., str]:
    """Factory of labelled tar shards (class folders c0, c1, ...) of smooth random JPEGs.

    Smooth (a 6x6 random image upscaled) so that models can learn something from them; written
    once per set of arguments and session. Every image is `size` (width, height), unless `sizes`
    is given: then image k (counting over all classes) is sizes[k % len(sizes)]. Returns the
    shard folder (with its manifest).
    """
    from pipeline.data.shards import write_shards

    made: dict[tuple, str] = {}

    def make(
        classes: int = 4,
        per_class: int = 16,
        size: tuple[int, int] = (48, 40),
        shard_size: int = 10,
        seed: int = 0,
        sizes: Sequence[tuple[int, int]] = (),
    ) -> str:
        key = (classes, per_class, tuple(size), shard_size, seed, tuple(map(tuple, sizes)))
        if key not in made:
            root = tmp_path_factory.mktemp("shards")
            rng = np.random.default_rng(seed)
            for c in range(classes):
                (root / "src" / f"c{c}").mkdir(parents=True)
                for i in range(per_class):
                    base = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
                    wh = sizes[(c * per_class + i) % len(sizes)] if sizes else size
                    img = Image.fromarray(base).resize(tuple(wh), Image.BILINEAR)
                    img.save(root / "src" / f"c{c}" / f"{i}.jpg", quality=90)
            write_shards(root / "src", root / "shards", shard_size=shard_size, progress=False)
            made[key] = str(root / "shards")
        return made[key]

    return make


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it: the models in unit tests are tiny, and
    extra intra-op threads only add spin-waits that make them several times slower on a busy
    machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

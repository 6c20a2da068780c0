"""Frozen-backbone features for the evaluation stages, extracted on every rank and gathered.

This module holds
- `make_accelerator`: accelerate's `Accelerator` set up for this pipeline (see below why it is not
  just `Accelerator()`);
- `image_features`: what one batch of images gives: the pooled embedding, the mean of the final
  patch tokens, and (ViT with a class token) the normalised class token of each of the last k
  blocks, as the DINO/DINOv2 linear evaluation uses them;
- `PixelFeatures`: the raw-pixel baseline in the place of a backbone (the evaluation crop,
  downsampled to at most 4,096 values), so the probes and the cache treat it like one;
- `extract_features`: every rank runs its own share of an evaluation loader through the backbone;
  each batch is gathered across ranks, padding repeats (id -1) are dropped and the whole set is
  ordered by global sample id, so every rank ends with the same `FeatureSet` whatever the world
  size (the exact-epoch loader splits samples, not shards, across ranks);
- `cached_features`: the same, cached under `run_dir/features/` with a fingerprint of the weights,
  the shards and the view settings; the k-NN and linear stages share one extraction.

Accelerate and an existing process group (checked in accelerate 1.15): `PartialState` joins a
group that is already initialised (the stage runner's, after DeepSpeed pretraining) instead of
creating one, and takes rank and world size from it. On a CPU-only machine it treats the process
as multi-process only with `cpu=True`; without it a 2-rank gloo group is seen as one process and
nothing is gathered. Its state is a process-wide singleton fixed by the first `Accelerator`, so
each stage resets it. (Fine-tuning trains on the pretraining trainer's DeepSpeed engine, not
through accelerate.)

Not here: classifiers (knn.py, linear.py), training (finetune.py), augmentation. The gathered
features are held in full on every rank (CPU memory): ImageNet with a ViT-B and 4 class tokens is
about 10 GB in fp16 per rank; a larger set needs a sharded probe instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Recipe
from pipeline.data.device_crops import device_views, to_device
from pipeline.data.loader import build_eval_loader, crops_on_device
from pipeline.data.transforms import normalize
from pipeline.fileio import atomic_file, write_atomic

log = logging.getLogger(__name__)

N_LAST_BLOCKS = 4  # class tokens kept from the last blocks (DINO's ViT-S linear probe uses 4)
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# accelerate


def make_accelerator() -> Any:
    """A fresh `Accelerator` on this process's rank (joining any existing process group)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # One stage's settings must not leak into the next: accelerate keeps them in singletons.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------
# Features of one batch


def _class_tokens(backbone: nn.Module) -> bool:
    """A ViT-like backbone with class tokens whose blocks and final norm we can tap."""
    return (
        getattr(backbone, "num_prefix_tokens", 0) > 0
        and isinstance(getattr(backbone, "blocks", None), nn.ModuleList)
        and isinstance(getattr(backbone, "norm", None), nn.Module)
    )


@torch.no_grad()
def image_features(
    backbone: nn.Module, images: torch.Tensor, n_last_blocks: int = N_LAST_BLOCKS
) -> dict[str, torch.Tensor]:
    """Features of normalised images (B, 3, H, W), float32.

    pooled (B, D): the backbone's own pooled embedding (what k-NN uses);
    avg (B, D): mean of the final patch tokens (or of the final feature map);
    cls (B, K, D): ViT with a class token only: the class token after each of the last K blocks,
    through the final norm (K = min(n_last_blocks, depth), oldest first).
    """
    own = getattr(backbone, "eval_features", None)
    if own is not None:  # a stand-in that is not a network (raw pixels) says what it gives
        return own(images)
    taps: list[torch.Tensor] = []
    hooks = []
    if _class_tokens(backbone) and n_last_blocks > 0:
        for block in list(backbone.blocks)[-n_last_blocks:]:
            hooks.append(block.register_forward_hook(lambda m, i, out: taps.append(out)))
    try:
        feats = backbone.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    out = {"pooled": backbone.pool(feats).float()}
    if feats.ndim == 3:  # (B, T, D) tokens
        prefix = getattr(backbone, "num_prefix_tokens", 0)
        out["avg"] = feats[:, prefix:].mean(dim=1).float()
    else:  # (B, H, W, D) channels-last map
        out["avg"] = feats.mean(dim=(1, 2)).float()
    if taps:
        prefix = backbone.num_prefix_tokens
        # Each tapped block output (B, T, D) goes through the final norm, as DINO's linear eval.
        out["cls"] = torch.stack([backbone.norm(t[:, :prefix])[:, 0] for t in taps], 1).float()
    return out


class PixelFeatures(nn.Module):
    """The raw-pixel baseline as a backbone stand-in: the normalised evaluation crop,
    area-downsampled (aspect kept) to at most `max_values` numbers and flattened.

    `eval_features` gives pooled (B, <= max_values) and an empty avg (B, 0): the probes then use
    one input, the pixels. The buffer makes its cache fingerprint differ from any other setting.
    """

    def __init__(self, max_values: int = 4096) -> None:
        super().__init__()
        self.register_buffer("max_values", torch.tensor(max_values), persistent=True)

    def eval_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _, c, h, w = images.shape  # (B, C, H, W)
        scale = min(1.0, math.sqrt(int(self.max_values) / (c * h * w)))
        size = (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))
        if size != (h, w):
            images = F.adaptive_avg_pool2d(images, size)  # area average: no aliasing
        pixels = images.float().flatten(1)  # (B, C * h' * w')
        return {"pooled": pixels, "avg": pixels[:, :0]}


# ---------------------------------------------------------------------------------------------
# A gathered, ordered feature set


@dataclass
class FeatureSet:
    """Features of one split, ordered by global sample id; identical on every rank.

    ids, labels: (N,) long; pooled, avg: (N, D) float32; cls: (N, K, D) float16 or None.
    """

    ids: torch.Tensor
    labels: torch.Tensor
    pooled: torch.Tensor
    avg: torch.Tensor
    cls: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: torch.Tensor) -> FeatureSet:
        """The rows `index` (a long index or a bool mask; an all-true mask returns self)."""
        if index.dtype == torch.bool and bool(index.all()):
            return self  # no copy of a memory-mapped cache
        return FeatureSet(**{f.name: _rows(getattr(self, f.name), index) for f in fields(self)})

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _rows(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[index]


def _gather_rows(accelerator: Any, t: torch.Tensor, pad: float) -> torch.Tensor:
    """All ranks' rows of `t`, rank 0's first; ranks may hold different row counts."""
    if accelerator.num_processes == 1:
        return t
    t = accelerator.pad_across_processes(t.contiguous(), dim=0, pad_index=pad)
    return accelerator.gather(t)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Any,
    accelerator: Any,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    n_last_blocks: int = N_LAST_BLOCKS,
    autocast_dtype: torch.dtype | None = None,
) -> FeatureSet:
    """Run this rank's share of `loader` through the frozen `backbone`; gather, order by id.

    Every rank must call this (each batch is gathered collectively; the exact-epoch loader gives
    every rank the same number of batches). Returns the same `FeatureSet` on every rank.
    """
    device = accelerator.device
    was_training = backbone.training
    backbone.eval()
    backbone.to(device)
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in loader:
            # (B, 4, H, W) uint8 RGBX, cut on the device first when the loader ships whole images
            images = device_views(to_device(batch["views"], device))[0]
            x = normalize([images], mean, std)[0]
            amp = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with amp:
                feats = image_features(backbone, x, n_last_blocks)
            if "cls" in feats:
                feats["cls"] = feats["cls"].half()  # see the module docstring: memory
            feats["ids"] = batch["id"].to(device)
            feats["labels"] = batch["label"].to(device)
            for key, value in feats.items():
                pad = -1 if key == "ids" else 0
                parts.setdefault(key, []).append(_gather_rows(accelerator, value, pad).cpu())
    finally:
        backbone.train(was_training)
    if not parts:
        raise ValueError("the evaluation loader gave no batch")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    ids = cat["ids"]
    # Drop padding repeats (id -1), then one row per id in id order: the same on any world size.
    keep = ids >= 0
    ids, order = torch.sort(ids[keep])
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    index = keep.nonzero().squeeze(1)[order][first]
    return FeatureSet(
        ids=ids[first],
        labels=cat["labels"][index],
        pooled=cat["pooled"][index],
        avg=cat["avg"][index],
        cls=cat["cls"][index] if "cls" in cat else None,
    )


# ---------------------------------------------------------------------------------------------
# Cache in the run directory


def weights_digest(module: nn.Module) -> str:
    """sha256 over the names and bytes of a module's state dict (a cache key for its features)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fingerprint(recipe: Recipe, shards: str, backbone: nn.Module, n_last_blocks: int) -> str:
    from pipeline.data.stream import resolve_shards

    d = recipe.data
    key = {
        "version": CACHE_VERSION,
        "shards": [(Path(s.url).name, s.samples) for s in resolve_shards(shards)],
        "spec": shards,
        "view": [d.eval_resize, d.eval_crop, list(d.color.mean), list(d.color.std)],
        "n_last_blocks": n_last_blocks,
        "weights": weights_digest(backbone),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _autocast_dtype(recipe: Recipe) -> torch.dtype | None:
    """bf16/fp16 inference on GPUs when the recipe trains in it; fp32 on CPU."""
    if not torch.cuda.is_available():
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.precision)


def cached_features(
    recipe: Recipe,
    backbone: nn.Module,
    run_dir: Path,
    split: str,
    accelerator: Any,
    *,
    n_last_blocks: int = N_LAST_BLOCKS,
) -> FeatureSet:
    """Features of `split` ("train": data.train.shards, "val": data.val.shards), from the cache
    `run_dir/features/{split}.pt` when its fingerprint matches, else extracted and cached."""
    shards = recipe.data.train.shards if split == "train" else recipe.data.val.shards
    if shards is None:
        raise ValueError(f"the {split} split has no shards (data.{split}.shards)")
    folder = Path(run_dir) / "features"
    data_path, meta_path = folder / f"{split}.pt", folder / f"{split}.json"
    fingerprint = _fingerprint(recipe, shards, backbone, n_last_blocks)
    if meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            log.info("features of %s from the cache %s", split, data_path)
            # mmap: ranks on one node share the page cache instead of one copy each.
            return FeatureSet(**torch.load(data_path, mmap=True, weights_only=True))
    loader = build_eval_loader(
        recipe.data,
        shards,
        batch_size=recipe.eval.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=recipe.run.seed,
        on_device=crops_on_device(recipe.data),
    )
    feats = extract_features(
        backbone,
        loader,
        accelerator,
        mean=recipe.data.color.mean,
        std=recipe.data.color.std,
        n_last_blocks=n_last_blocks,
        autocast_dtype=_autocast_dtype(recipe),
    )
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(data_path) as f:
            torch.save(feats.state_dict(), f)
        meta = {"fingerprint": fingerprint, "samples": len(feats), "shards": shards}
        write_atomic(meta_path, json.dumps(meta, indent=1))  # names a complete .pt: written last
    accelerator.wait_for_everyone()
    return feats

"""Linear probe: many linear heads on cached frozen features, trained together in one pass.

Protocol (DINOv2's grid, with MAE's feature standardisation):
- features are extracted once per split and cached (`features.cached_features`): the pooled
  embedding, the mean patch token and, for ViT with a class token, the class tokens of the last
  4 blocks;
- the feature choices are, for such a ViT, the class token of the last 1 or 4 blocks, each with or
  without the mean patch token concatenated (`cls1`, `cls1+avg`, `cls4`, `cls4+avg`); otherwise
  the pooled embedding and the mean token (`pooled`, `avg`). Each component is standardised with
  the training set's per-dimension mean and std (BatchNorm without affine, frozen, as MAE's
  probe): one lr grid then suits features of any scale;
- one head per (feature choice, lr of eval.linear.lrs), all updated on the same batches: SGD with
  momentum 0.9, no weight decay, lr x global batch / 256, cosine to 0 over eval.linear.epochs;
- `VAL_FRACTION` of each class of data.train.shards is held out (seeded by run.seed); every head
  is scored on it, the best is chosen there and reported on data.val.shards (the test split).
  Every head's figures are reported, too;
- few-shot (`eval.linear.few_shot`): the same grid trained on N images per class of the training
  part, chosen on the same held-out part.

Training is data-parallel through accelerate (each rank takes its part of every global batch;
DDP averages the gradients), evaluation splits the rows across ranks and sums the counts.
Not here: feature extraction (features.py), k-NN (knn.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LinearConfig, Recipe
from pipeline.eval.features import FeatureSet, cached_features, make_accelerator

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # share of each class of the training data held out to choose the head
MOMENTUM = 0.9
EVAL_CHUNK = 4096  # rows per evaluation forward


# ---------------------------------------------------------------------------------------------
# Splits


def split_train_val(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified hold-out: (train rows, val rows), sorted. Each class with >= 2 images gives
    max(1, round(fraction * n)) of them to val. A pure function of (labels, seed)."""
    rng = np.random.default_rng([seed, 1])
    y = labels.numpy()
    val: list[np.ndarray] = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) >= 2:
            n = max(1, round(fraction * len(rows)))
            val.append(rng.permutation(rows)[:n])
    val_rows = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[val_rows] = False
    return torch.from_numpy(np.flatnonzero(mask)), torch.from_numpy(val_rows)


def few_shot_rows(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """`shots` rows per class (all of a smaller class), seeded; sorted row indices."""
    rng = np.random.default_rng([seed, 2, shots])
    y = labels.numpy()
    rows = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return torch.from_numpy(np.sort(np.concatenate(rows)))


# ---------------------------------------------------------------------------------------------
# Feature choices


@dataclass(frozen=True)
class FeatureChoice:
    """Which cached components make a head's input: class tokens of the last `n_blocks` blocks,
    the mean patch token (`avg`), the pooled embedding (`pooled`)."""

    name: str
    n_blocks: int = 0
    avg: bool = False
    pooled: bool = False


def feature_choices(features: FeatureSet) -> list[FeatureChoice]:
    """The grid of inputs this backbone's features allow (see the module docstring)."""
    if features.cls is None:
        if features.avg.shape[1] == 0:  # one input only (the raw-pixel baseline)
            return [FeatureChoice("pooled", pooled=True)]
        return [FeatureChoice("pooled", pooled=True), FeatureChoice("avg", avg=True)]
    blocks = sorted({1, features.cls.shape[1]})
    return [
        FeatureChoice(f"cls{n}{'+avg' if avg else ''}", n_blocks=n, avg=avg)
        for n in blocks
        for avg in (False, True)
    ]


@dataclass
class Standardizer:
    """Per-dimension (x - mean) / std of each component, from the training rows."""

    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def fit(cls, features: FeatureSet, chunk: int = 65536) -> Standardizer:
        stats = {}
        for key in ("pooled", "avg", "cls"):
            t = getattr(features, key)
            if t is None:
                continue
            total = torch.zeros(t.shape[1:], dtype=torch.float64)
            squares = torch.zeros_like(total)
            for start in range(0, len(t), chunk):  # the cache may be larger than memory (mmap)
                x = t[start : start + chunk].double()
                total += x.sum(0)
                squares += (x * x).sum(0)
            mean = total / len(t)
            var = (squares / len(t) - mean * mean).clamp(min=0)
            std = var.sqrt()
            # A dimension constant on the training rows (a border pixel) keeps scale 1, as
            # scikit-learn's StandardScaler: dividing by ~0 would blow up a test image's value.
            floor = 1e-8 * float(std.max()) if std.numel() else 0.0
            std = torch.where(std > floor, std, torch.ones_like(std))
            stats[key] = (mean.float(), std.float())
        return cls(stats)

    def inputs(
        self, features: FeatureSet, choices: list[FeatureChoice], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Each choice's standardised input (rows, d) for the rows of `features`, on `device`."""
        parts = {}
        for key, (mean, std) in self.stats.items():
            x = getattr(features, key).to(device).float()
            parts[key] = (x - mean.to(device)) / std.to(device)
        out = {}
        for c in choices:
            pieces = []
            if c.n_blocks:
                pieces.append(parts["cls"][:, -c.n_blocks :].flatten(1))  # (rows, n * D)
            if c.avg:
                pieces.append(parts["avg"])
            if c.pooled:
                pieces.append(parts["pooled"])
            out[c.name] = torch.cat(pieces, dim=1)
        return out


def input_dim(features: FeatureSet, choice: FeatureChoice) -> int:
    d = features.pooled.shape[1]
    return d * (choice.n_blocks + int(choice.avg) + int(choice.pooled))


# ---------------------------------------------------------------------------------------------
# Heads


@dataclass(frozen=True)
class HeadSpec:
    """One head: its input choice and base learning rate (per 256 images)."""

    choice: str
    lr: float

    @property
    def name(self) -> str:
        return f"{self.choice}_lr{self.lr:g}"


class LinearHeads(nn.Module):
    """One linear classifier per spec; `forward` maps each choice's input to each head's logits."""

    def __init__(self, specs: list[HeadSpec], dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.specs = specs
        self.heads = nn.ModuleList(nn.Linear(dims[s.choice], num_classes) for s in specs)
        for head in self.heads:  # DINO's linear classifier initialisation
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [head(inputs[s.choice]) for s, head in zip(self.specs, self.heads, strict=True)]


def _rank_rows(n: int, step: int, epoch: int, batch: int, rank: int, world: int, seed: int):
    """This rank's rows of global batch `step` of `epoch`: a seeded permutation of the n rows,
    wrapped around at the end so every rank takes `batch` rows at every step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    start = step * batch * world + rank * batch
    return perm[torch.arange(start, start + batch) % n]


@torch.no_grad()
def evaluate_heads(
    model: LinearHeads,
    std: Standardizer,
    choices: list[FeatureChoice],
    features: FeatureSet,
    accelerator: Any,
) -> dict[str, tuple[float, float]]:
    """Top-1 and top-5 (percent) of every head on `features`: {head name: (top1, top5)}."""
    rank, world = accelerator.process_index, accelerator.num_processes
    lo, hi = rank * len(features) // world, (rank + 1) * len(features) // world
    device = accelerator.device
    counts = torch.zeros(len(model.specs), 2, dtype=torch.long, device=device)
    for start in range(lo, hi, EVAL_CHUNK):
        rows = features.select(torch.arange(start, min(start + EVAL_CHUNK, hi)))
        target = rows.labels.to(device)
        for i, logits in enumerate(model(std.inputs(rows, choices, device))):
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == target[:, None]
            counts[i, 0] += hit[:, 0].sum()
            counts[i, 1] += hit.any(dim=1).sum()
    counts = accelerator.reduce(counts, reduction="sum").cpu()
    n = max(len(features), 1)
    return {
        s.name: (100.0 * int(c[0]) / n, 100.0 * int(c[1]) / n)
        for s, c in zip(model.specs, counts, strict=True)
    }


def train_heads(
    train: FeatureSet,
    evals: dict[str, FeatureSet],
    cfg: LinearConfig,
    accelerator: Any,
    *,
    num_classes: int,
    seed: int,
    metrics_path: Path | None = None,
    tag: str = "full",
) -> dict[str, dict[str, tuple[float, float]]]:
    """Train the grid of heads on `train`, then score them on each of `evals`.

    Returns {eval name: {head name: (top1, top5)}}. Every rank must call it with the same data.
    """
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    choices = feature_choices(train)
    std = Standardizer.fit(train)
    specs = [HeadSpec(c.name, lr) for c in choices for lr in cfg.lrs]
    dims = {c.name: input_dim(train, c) for c in choices}
    torch.manual_seed(seed)  # the same initial heads on every rank
    model = LinearHeads(specs, dims, num_classes).to(device)
    batch = min(cfg.batch_size, math.ceil(len(train) / world))  # few-shot sets are small
    global_batch = batch * world
    base = [s.lr * global_batch / 256 for s in specs]
    optimizer = torch.optim.SGD(
        [{"params": h.parameters(), "lr": lr} for h, lr in zip(model.heads, base, strict=True)],
        momentum=MOMENTUM,
        weight_decay=0.0,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    steps_per_epoch = math.ceil(len(train) / global_batch)
    total = cfg.epochs * steps_per_epoch
    step = 0
    for epoch in range(cfg.epochs):
        running = torch.zeros(len(specs), device=device)
        for i in range(steps_per_epoch):
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine to 0
            for group, lr in zip(optimizer.param_groups, base, strict=True):
                group["lr"] = lr * scale
            rows = train.select(_rank_rows(len(train), i, epoch, batch, rank, world, seed))
            target = rows.labels.to(device)
            losses = torch.stack(
                [F.cross_entropy(z, target) for z in model(std.inputs(rows, choices, device))]
            )
            accelerator.backward(losses.sum())  # heads are independent: one backward for all
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += losses.detach()
            step += 1
        if metrics_path is not None:
            mean_loss = accelerator.reduce(running / steps_per_epoch, reduction="mean").cpu()
            if accelerator.is_main_process:
                record = {"set": tag, "epoch": epoch + 1, "step": step}
                record.update(
                    {
                        f"loss/{s.name}": round(float(v), 5)
                        for s, v in zip(specs, mean_loss, strict=True)
                    }
                )
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    heads = accelerator.unwrap_model(model)
    return {
        name: evaluate_heads(heads, std, choices, fs, accelerator) for name, fs in evals.items()
    }


# ---------------------------------------------------------------------------------------------
# The stage


def _pick(scores: dict[str, dict[str, tuple[float, float]]], suffix: str) -> dict[str, Any]:
    """Best head on the held-out split, its test figures, and every head's figures."""
    best = max(scores["val"], key=lambda name: scores["val"][name][0])
    heads = {
        name: {"val_top1": scores["val"][name][0], "test_top1": scores["test"][name][0]}
        for name in scores["val"]
    }
    return {
        f"linear_top1{suffix}": scores["test"][best][0],
        f"linear_top5{suffix}": scores["test"][best][1],
        f"linear_best_head{suffix}": best,
        f"linear_heads{suffix}": heads,
    }


def linear_stage(recipe: Recipe, backbone: nn.Module, run_dir: Path) -> dict[str, Any]:
    """Linear probe of `backbone` (and few-shot probes); figures in percent.

    Keys: linear_top1 / linear_top5 (test split, head chosen on the held-out split),
    linear_best_head, linear_heads ({head: {val_top1, test_top1}}); for each N of
    eval.linear.few_shot the same with the suffix `_{N}shot`. Every rank must call it; every rank
    returns the figures. Features are cached under run_dir/features; per-epoch losses go to
    run_dir/linear_metrics.jsonl, the figures to run_dir/linear.json.
    """
    run_dir = Path(run_dir)
    accelerator = make_accelerator()
    train_all = cached_features(recipe, backbone, run_dir, "train", accelerator)
    test = cached_features(recipe, backbone, run_dir, "val", accelerator)
    train_all = train_all.select(train_all.labels >= 0)
    test = test.select(test.labels >= 0)
    if len(train_all) < 2 or len(test) == 0:
        raise ValueError("the linear probe needs labelled images in data.train and data.val")
    num_classes = int(max(train_all.labels.max(), test.labels.max())) + 1
    seed = recipe.run.seed
    train_rows, val_rows = split_train_val(train_all.labels, VAL_FRACTION, seed)
    train, val = train_all.select(train_rows), train_all.select(val_rows)
    metrics = run_dir / "linear_metrics.jsonl"
    if accelerator.is_main_process:
        metrics.unlink(missing_ok=True)  # one probe per file: a rerun starts it afresh
    cfg = recipe.eval.linear
    evals = {"val": val, "test": test}
    kw = dict(num_classes=num_classes, seed=seed, metrics_path=metrics)
    results = _pick(train_heads(train, evals, cfg, accelerator, tag="full", **kw), "")
    for shots in cfg.few_shot:
        subset = train.select(few_shot_rows(train.labels, shots, seed))
        scores = train_heads(subset, evals, cfg, accelerator, tag=f"{shots}shot", **kw)
        results.update(_pick(scores, f"_{shots}shot"))
    if accelerator.is_main_process:
        record = {**results, "train": len(train), "heldout": len(val), "test": len(test)}
        (run_dir / "linear.json").write_text(json.dumps(record, indent=1) + "\n")
        log.info(
            "linear probe: top-1 %.2f (%s)", results["linear_top1"], results["linear_best_head"]
        )
    return results

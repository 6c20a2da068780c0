"""Logistic-regression probe: full-batch L-BFGS on cached, standardised frozen features.

Protocol (DINOv2's `log_regression`, in torch so it runs where the features are, GPU included):
- the features of data.train.shards and data.val.shards come from the cache the k-NN and linear
  stages share (`features.cached_features`); the probe reads one component (`eval.logreg.feature`,
  by default the pooled embedding k-NN uses), standardised per dimension with the training set's
  mean and std (a constant dimension keeps std 1, as scikit-learn's StandardScaler);
- for every C of `eval.logreg.cs` a multinomial logistic regression is fitted on the training
  part of data.train.shards (the same stratified hold-out as the linear probe) by minimising
  mean cross-entropy + ||W||^2 / (2 C N): scikit-learn's `LogisticRegression(C)` objective divided
  by C N, so the same C means the same solution (the bias is not penalised, as there);
- the C with the best top-1 on the held-out part is refitted on the whole training set and
  reported on data.val; every C's held-out figure is in the results.

Each C starts from zero (no warm start), so the figures do not depend on how the grid is split
across ranks: rank r fits every world-th C, the held-out accuracies are summed across ranks, and
every rank refits the chosen C (identical data, identical result). Not here: feature extraction
(features.py), the SGD heads (linear.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Recipe
from pipeline.config_schema import LogregConfig
from pipeline.eval.features import FeatureSet, cached_features, make_accelerator
from pipeline.eval.linear import VAL_FRACTION, split_train_val

log = logging.getLogger(__name__)

CHUNK = 65536  # rows per forward in the loss and in scoring: bounds the (rows, classes) logits


def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(x - mean) / std with the training rows' statistics, applied to `train` and `others`.

    A dimension that is constant on the training rows keeps std 1 (scikit-learn's rule): dividing
    by ~0 would turn a test image's small difference there into a huge input.
    """
    mean = train.double().mean(0)
    std = train.double().std(0, unbiased=False)
    floor = 1e-8 * float(std.max()) if std.numel() else 0.0
    std = torch.where(std > floor, std, torch.ones_like(std))
    mean, std = mean.to(train.dtype), std.to(train.dtype)
    return tuple((x - mean) / std for x in (train, *others))


def fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    c: float,
    num_classes: int,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> nn.Linear:
    """A multinomial logistic regression on (x (N, D), y (N,)) with L2 strength 1 / C.

    Minimises mean cross-entropy + ||W||^2 / (2 C N) with full-batch L-BFGS (strong Wolfe line
    search) from zero weights, on x's device and dtype. Stops after `max_iter` iterations or
    when the largest gradient entry falls below `tol`.
    """
    n, d = x.shape
    model = nn.Linear(d, num_classes, device=x.device, dtype=x.dtype)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    penalty = 1.0 / (2.0 * c * n)
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        total = torch.zeros((), device=x.device, dtype=x.dtype)
        for start in range(0, n, CHUNK):  # gradients accumulate chunk by chunk: bounded memory
            logits = model(x[start : start + CHUNK])
            loss = F.cross_entropy(logits, y[start : start + CHUNK], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        reg = penalty * model.weight.pow(2).sum()
        reg.backward()
        return total + reg.detach()

    optimizer.step(closure)
    return model


@torch.no_grad()
def accuracy(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 (percent) of `model` on (x, y)."""
    hits = torch.zeros(2, dtype=torch.long)
    for start in range(0, len(x), CHUNK):
        logits = model(x[start : start + CHUNK])
        target = y[start : start + CHUNK]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == target[:, None]
        hits += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).cpu()
    n = max(len(x), 1)
    return 100.0 * int(hits[0]) / n, 100.0 * int(hits[1]) / n


def _component(features: FeatureSet, name: str) -> torch.Tensor:
    """The (N, D) input the probe reads: `pooled`, `avg`, or `clsN[+avg]` (last N class tokens)."""
    if name in ("pooled", "avg"):
        return getattr(features, name).float()
    if not name.startswith("cls"):
        raise ValueError(f"eval.logreg.feature={name!r}: use pooled, avg, clsN or clsN+avg")
    if features.cls is None:  # no class token (raw pixels, Swin, pooled ViT): the embedding
        return features.pooled.float()
    with_avg = name.endswith("+avg")
    blocks = int(name[3:].removesuffix("+avg") or 1)
    parts = [features.cls[:, -blocks:].float().flatten(1)]  # (N, blocks * D)
    if with_avg:
        parts.append(features.avg.float())
    return torch.cat(parts, dim=1)


def logreg_probe(
    train: FeatureSet,
    test: FeatureSet,
    cfg: LogregConfig,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    reduce: Any = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Choose C on a hold-out of `train`, refit on all of `train`, score on `test`.

    `reduce(tensor) -> tensor` sums a tensor across ranks (None: one process). Returns
    logreg_top1 / logreg_top5 (percent), logreg_c (the chosen C) and logreg_heldout
    ({C: held-out top-1}).
    """
    device = device or torch.device("cpu")
    labels = train.labels
    num_classes = int(max(labels.max(), test.labels.max())) + 1
    x_all, x_test = standardize(
        _component(train, cfg.feature).to(device), _component(test, cfg.feature).to(device)
    )
    y_all, y_test = labels.to(device), test.labels.to(device)
    fit_rows, held_rows = split_train_val(labels, VAL_FRACTION, seed)
    fit_rows, held_rows = fit_rows.to(device), held_rows.to(device)
    x_fit, y_fit = x_all[fit_rows], y_all[fit_rows]  # copied once, not per C (ImageNet: GBs)
    x_held, y_held = x_all[held_rows], y_all[held_rows]
    heldout = torch.zeros(len(cfg.cs), dtype=torch.float64, device=device)
    for i in range(rank, len(cfg.cs), world_size):
        model = fit_logreg(x_fit, y_fit, cfg.cs[i], num_classes, max_iter=cfg.max_iter, tol=cfg.tol)
        heldout[i] = accuracy(model, x_held, y_held)[0]
    del x_fit, x_held
    if reduce is not None and world_size > 1:
        heldout = reduce(heldout)
    # Ties go to the first C listed (the strongest regularisation when cs ascends).
    best = int(torch.argmax(heldout).item())
    model = fit_logreg(x_all, y_all, cfg.cs[best], num_classes, max_iter=cfg.max_iter, tol=cfg.tol)
    top1, top5 = accuracy(model, x_test, y_test)
    return {
        "logreg_top1": top1,
        "logreg_top5": top5,
        "logreg_c": cfg.cs[best],
        "logreg_heldout": {
            f"{c:g}": float(a) for c, a in zip(cfg.cs, heldout.tolist(), strict=True)
        },
    }


def logreg_stage(recipe: Recipe, backbone: nn.Module, run_dir: Path) -> dict[str, Any]:
    """Logistic-regression probe of `backbone` (figures in percent; see the module docstring).

    Every rank must call it; every rank returns the figures. Features are cached under
    run_dir/features; the figures also go to run_dir/logreg.json.
    """
    run_dir = Path(run_dir)
    accelerator = make_accelerator()
    train = cached_features(recipe, backbone, run_dir, "train", accelerator)
    test = cached_features(recipe, backbone, run_dir, "val", accelerator)
    train, test = train.select(train.labels >= 0), test.select(test.labels >= 0)
    if len(train) < 2 or len(test) == 0:
        raise ValueError("the logistic regression needs labelled images in data.train and data.val")
    results = logreg_probe(
        train,
        test,
        recipe.eval.logreg,
        seed=recipe.run.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        reduce=lambda t: accelerator.reduce(t, reduction="sum"),
        device=accelerator.device,
    )
    if accelerator.is_main_process:
        record = {**results, "train": len(train), "test": len(test)}
        (run_dir / "logreg.json").write_text(json.dumps(record, indent=1) + "\n")
        log.info(
            "logistic regression: top-1 %.2f (C=%g)", results["logreg_top1"], results["logreg_c"]
        )
    return results

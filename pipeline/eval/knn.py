"""Weighted k-NN classification on frozen features (DINO's protocol).

Every training image's L2-normalised pooled embedding is the memory bank; a query votes for the
classes of its k most similar bank entries (cosine similarity), each vote weighted by
exp(similarity / T). Top-1 and top-5 are reported for every k of `eval.knn.k`, in percent.

`knn_stage` extracts (or reads from the cache) the features of data.train.shards (bank) and
data.val.shards (queries) on every rank, splits the queries across ranks and sums the counts.
`knn_counts` is the maths alone, on tensors. Not here: feature extraction (features.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Recipe
from pipeline.eval.features import cached_features, make_accelerator

log = logging.getLogger(__name__)

HEADLINE_K = 20  # the k reported as knn_top1 / knn_top5 when listed (DINO's headline figure)


@torch.no_grad()
def knn_counts(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk: int = 256,
) -> dict[int, tuple[int, int]]:
    """Correct top-1 and top-5 predictions of weighted k-NN, for each k: {k: (top1, top5)}.

    bank (N, D) and queries (M, D) are L2-normalised here; labels are in [0, num_classes).
    A k larger than the bank uses the whole bank.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float().to(bank.device), dim=1)
    bank_labels = bank_labels.to(bank.device)
    query_labels = query_labels.to(bank.device)
    k_max = min(max(ks), len(bank))
    counts = {k: [0, 0] for k in ks}
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        target = query_labels[start : start + chunk]
        sim, idx = (q @ bank.T).topk(k_max, dim=1)  # (c, k_max), most similar first
        weight = (sim / temperature).exp()
        neighbour = bank_labels[idx]  # (c, k_max)
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(q), num_classes, device=bank.device)
            votes.scatter_add_(1, neighbour[:, :kk], weight[:, :kk])  # (c, C)
            top = votes.topk(min(5, num_classes), dim=1).indices
            hit = top == target[:, None]
            counts[k][0] += int(hit[:, 0].sum())
            counts[k][1] += int(hit.any(dim=1).sum())
    return {k: (c[0], c[1]) for k, c in counts.items()}


def knn_stage(recipe: Recipe, backbone: nn.Module, run_dir: Path) -> dict[str, float]:
    """k-NN top-1/top-5 (percent) of `backbone` for every k of eval.knn.k.

    Keys: knn_top1_k{k}, knn_top5_k{k}, and knn_top1 / knn_top5 at k = 20 (else the first k).
    Every rank must call it; every rank returns the figures. Also writes run_dir/knn.json.
    """
    accelerator = make_accelerator()
    run_dir = Path(run_dir)
    train = cached_features(recipe, backbone, run_dir, "train", accelerator)
    val = cached_features(recipe, backbone, run_dir, "val", accelerator)
    train, val = train.select(train.labels >= 0), val.select(val.labels >= 0)
    if len(train) == 0 or len(val) == 0:
        raise ValueError("k-NN needs labelled images in data.train.shards and data.val.shards")
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    cfg = recipe.eval.knn

    # Each rank answers a contiguous share of the queries; the counts are summed.
    rank, world = accelerator.process_index, accelerator.num_processes
    lo, hi = rank * len(val) // world, (rank + 1) * len(val) // world
    counts = knn_counts(
        train.pooled.to(accelerator.device),
        train.labels,
        val.pooled[lo:hi],
        val.labels[lo:hi],
        cfg.k,
        cfg.temperature,
        num_classes,
    )
    local = torch.tensor([counts[k] for k in cfg.k], dtype=torch.long, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").cpu()
    results: dict[str, float] = {}
    for k, (top1, top5) in zip(cfg.k, total.tolist(), strict=True):
        results[f"knn_top1_k{k}"] = 100.0 * top1 / len(val)
        results[f"knn_top5_k{k}"] = 100.0 * top5 / len(val)
    headline = HEADLINE_K if HEADLINE_K in cfg.k else cfg.k[0]
    results["knn_top1"] = results[f"knn_top1_k{headline}"]
    results["knn_top5"] = results[f"knn_top5_k{headline}"]
    if accelerator.is_main_process:
        record = {**results, "k_headline": headline, "bank": len(train), "queries": len(val)}
        (run_dir / "knn.json").write_text(json.dumps(record, indent=1) + "\n")
        log.info("k-NN: %s", ", ".join(f"{k}={v:.2f}" for k, v in results.items()))
    return results

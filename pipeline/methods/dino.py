"""DINO (Caron et al., 2021): self-distillation with a momentum teacher and multi-crop, with
DINOv2's additions (Oquab et al., 2023) as options of the same objective.

This module holds the single-device maths:

- `DINOHead`: MLP -> L2-normalise -> weight-normalised prototypes layer;
- `DINOLoss`: teacher centring + sharpening, the cross-view cross-entropy, the centre EMA and the
  collapse monitors; the centre is a buffer, so it is in every `state_dict` (exact resume);
- `DINO`: the student (backbone + head + loss), the module the engine wraps;
- teacher helpers as plain functions: `make_teacher`, `ema_update_`;
- DINOv2's parts: `sinkhorn_knopp` (centring by three Sinkhorn-Knopp iterations over the global
  batch instead of the running centre: `centering="sinkhorn_knopp"`), `ibot_masks`, `block_mask`
  and `ibot_loss` (iBOT's masked-patch self-distillation on the global crops, `ibot_weight > 0`),
  and `koleo_loss`. With their defaults (`ibot_weight=0`, `centering="center"`) nothing of them runs
  and DINO is unchanged to the bit.

iBOT: a share of the global-crop samples get a random patch mask; the student sees those patches
as a learned `mask_token`, the teacher sees the whole crop, and the student's head outputs at the
masked patches learn the teacher's (centred, sharpened) outputs at the same patches. The head is
DINO's (`ibot_separate_head=False`, DINOv2's default) or a second one of the same shape. Masks
are rectangles of patches, as DINOv2 draws them (`block_mask`), or patches picked uniformly at
random (`ibot_masks(shape="random")`), with the same counts per sample.

It deliberately does not hold: collectives (the centre's all-reduce is passed in as a function),
device placement, schedules (teacher momentum and temperature come in as numbers, computed by
`pipeline.train.schedules`), or the EMA's choice of tensors. `ema_update_` works on any two matching
lists of tensors, so the engine can run it on full parameters or on each rank's local ZeRO-3 shards
(the teacher stays out of the student's DeepSpeed engine and is kept in fp32).

Collapse monitors (logged every step, from the local batch, under no_grad), in nats:

- `teacher_entropy`: mean entropy of the teacher's centred, sharpened distribution per sample.
  Collapse to the uniform distribution (centring wins) drives it to log(out_dim).
- `kl_to_uniform`: KL(mean teacher distribution || uniform) = log(out_dim) - H(mean distribution).
  Collapse to one dimension (sharpening wins: every sample picks the same prototype) drives it to
  log(out_dim).
- Healthy training: teacher_entropy well below log(out_dim) (confident per sample) while
  kl_to_uniform stays well below log(out_dim) (samples spread over many prototypes).
- `student_entropy`: the same per-sample entropy for the student at `student_temp`.

`loss - teacher_entropy` is KL(teacher || student), the part of the loss the student controls: the
raw loss can rise while training is fine, because the teacher's entropy moves (e.g. the zero
initial centre makes the first steps' targets nearly one-hot and identical across samples, and the
loss rises as centring spreads them out).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pipeline.config import DinoConfig
from pipeline.data.packing import PackedBatch, cat_packed
from pipeline.models.base import Backbone

AllReduce = Callable[[torch.Tensor], torch.Tensor]


# Head ----------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """Projection head: 3-layer MLP to a bottleneck, L2 normalisation, then `out_dim` prototypes.

    `use_bn` (DINO's option) puts BatchNorm after the hidden layers: the head's outputs then vary
    across samples from the first step, which keeps small models from settling on the uniform
    output. The prototypes layer is weight-normalised (`weight = g * v / ||v||`, per output row)
    and has no bias. With `norm_last_layer` the magnitude `g` is fixed to 1 and not trained, so
    every logit is a cosine similarity in [-1, 1]; DINO reports this as the more stable choice.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()

        def norm() -> list[nn.Module]:
            # Batch statistics always (no running averages): the teacher, in eval mode, normalises
            # like the student, and there are no buffers to keep in step between the two.
            return [nn.BatchNorm1d(hidden_dim, track_running_stats=False)] if use_bn else []

        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            *norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            *norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # As in DINO, the prototypes keep nn.Linear's default init; only their direction matters.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) logits."""
        x = self.mlp(x)  # (B, bottleneck)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# Multi-crop forward (student and teacher) ----------------------------------------------------


def multicrop_embed(
    backbone: nn.Module,
    head: nn.Module,
    views: Sequence[torch.Tensor] | Sequence[PackedBatch],
    pooled_out: list[torch.Tensor] | None = None,
    masks: Sequence[torch.Tensor] | None = None,
    mask_token: torch.Tensor | None = None,
    patches_out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Head outputs per view, with one backbone call per distinct resolution.

    Views of equal size (the global crops; the local crops) are concatenated along the batch and run
    together, which is what makes multi-crop affordable; the head then runs once over all of them.
    Outputs come back in the order of `views`, each (B_view, out_dim). When `pooled_out` is given,
    the backbone's pooled features per view are appended to it, in the same order.

    Packed views (NaViT: view i of every image in one `PackedBatch`, each image at its own size)
    run as one packed batch of all their rows, one backbone call; image j of view i is row j of
    output i, as unpacked.

    iBOT: `masks` holds a (B_view, N) bool mask for each of the first `len(masks)` views; their
    backbone features at the masked patches (sum masked, D), sample-major, are appended to
    `patches_out`, one tensor per masked view. With `mask_token` (the student) those patches
    enter the backbone as the token; without it (the teacher) the backbone sees the whole crop.
    """
    if views and isinstance(views[0], PackedBatch):
        counts = [v.num_images for v in views]
        # Through __call__ (not forward_packed) so module hooks run, ZeRO-3's included.
        feats = backbone(cat_packed(views))  # (sum of images, D), view after view
        if pooled_out is not None:
            pooled_out.extend(feats.split(counts))
        return list(head(feats).split(counts))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault(tuple(view.shape[1:]), []).append(i)
    order = [i for idx in groups.values() for i in idx]
    if masks is not None:
        return _masked_multicrop(
            backbone, head, views, groups, order, masks, mask_token, pooled_out, patches_out
        )
    # Through __call__ (not forward_features/pool) so module hooks run, ZeRO-3's included.
    pooled = [backbone(torch.cat([views[i] for i in idx])) for idx in groups.values()]
    out = head(torch.cat(pooled))  # (sum of B_view, out_dim), views in `order`
    chunks = out.split([views[i].shape[0] for i in order])
    by_view: dict[int, torch.Tensor] = dict(zip(order, chunks, strict=True))
    if pooled_out is not None:
        feats = torch.cat(pooled).split([views[i].shape[0] for i in order])
        by_feat = dict(zip(order, feats, strict=True))
        pooled_out.extend(by_feat[i] for i in range(len(views)))
    return [by_view[i] for i in range(len(views))]


def _masked_multicrop(
    backbone: nn.Module,
    head: nn.Module,
    views: Sequence[torch.Tensor],
    groups: dict[tuple[int, ...], list[int]],
    order: list[int],
    masks: Sequence[torch.Tensor],
    mask_token: torch.Tensor | None,
    pooled_out: list[torch.Tensor] | None,
    patches_out: list[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """`multicrop_embed` with iBOT masks on the first `len(masks)` views (see there)."""
    pooled: list[torch.Tensor] = []
    patch_feats: dict[int, torch.Tensor] = {}
    for idx in groups.values():
        x = torch.cat([views[i] for i in idx])
        if not any(i < len(masks) for i in idx):
            pooled.append(backbone(x))
            continue
        rows, cols = backbone.grid_size(*x.shape[-2:])
        m = torch.cat([
            masks[i] if i < len(masks)
            else torch.zeros(views[i].shape[0], rows * cols, dtype=torch.bool, device=x.device)
            for i in idx
        ])  # fmt: skip
        # Through __call__ with keywords, so ZeRO-3's hooks gather the backbone's own tensors.
        p, tokens = backbone(x, masks=m if mask_token is not None else None,
                             mask_token=mask_token, patch_tokens=True)  # fmt: skip
        pooled.append(p)
        for i, t in zip(idx, tokens.split([views[i].shape[0] for i in idx]), strict=True):
            if i < len(masks):
                patch_feats[i] = t[masks[i]]  # (masked in view i, D), sample-major
    out = head(torch.cat(pooled))
    sizes = [views[i].shape[0] for i in order]
    by_view = dict(zip(order, out.split(sizes), strict=True))
    if pooled_out is not None:
        by_feat = dict(zip(order, torch.cat(pooled).split(sizes), strict=True))
        pooled_out.extend(by_feat[i] for i in range(len(views)))
    if patches_out is not None:
        patches_out.extend(patch_feats[i] for i in range(len(masks)))
    return [by_view[i] for i in range(len(views))]


def sinkhorn_knopp(
    logits: torch.Tensor,
    temp: float,
    all_reduce: AllReduce | None = None,
    iterations: int = 3,
) -> torch.Tensor:
    """Teacher targets (B, K) by Sinkhorn-Knopp over the global batch (DINOv2's centring).

    `Q = exp(logits / temp)^T` (K, B) is scaled to sum 1, then `iterations` times each prototype
    row is scaled to total 1/K over the batch of all ranks, and each sample column to 1/B, B the
    global sample count; the result, x B, has rows (samples) that sum to 1. `all_reduce` sums
    over the data-parallel ranks (the total, the row sums, and the sample count, so ranks may hold
    different numbers of samples); None for a single process.
    """
    q = torch.exp(logits.float() / temp).T  # (K, B_local)
    # The global total and sample count in one collective.
    totals = torch.stack([q.sum(), q.new_tensor(float(q.shape[1]))])
    if all_reduce is not None:
        totals = all_reduce(totals)
    total, count = totals[0], totals[1]
    k = q.shape[0]
    q = q / total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)  # (K, 1): each prototype's weight
        if all_reduce is not None:
            rows = all_reduce(rows)
        q = q / rows / k
        q = q / q.sum(dim=0, keepdim=True) / count  # each sample's weight: 1/B
    return (q * count).T


def ibot_masks(
    samples: int,
    grid: tuple[int, int],
    ratio: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shape: Literal["block", "random"] = "block",
) -> torch.Tensor:
    """iBOT patch masks (samples, rows x cols) bool over a (rows, cols) patch grid, row-major.

    Counts as DINOv2's collate: `int(samples x probability)` samples are masked, the others not;
    the masked ones' ratios are stratified over `ratio`: sample i of n draws uniformly in the i-th
    of n equal slices of [min, max], and targets `int(patches x ratio_i)` patches. Which samples
    are masked is a uniform draw. `shape="block"` hides rectangles of patches (`block_mask`), and
    may fall a few patches short of a target; `shape="random"` hides exactly the target, picked
    uniformly at random.
    """
    device = generator.device if generator is not None and device is None else device
    patches = grid[0] * grid[1]
    n_masked = int(samples * probability)
    bounds = torch.linspace(ratio[0], ratio[1], n_masked + 1, device=device)
    u = torch.rand(n_masked, generator=generator, device=device)
    ratios = bounds[:-1] + (bounds[1:] - bounds[:-1]) * u
    counts = torch.zeros(samples, dtype=torch.long, device=device)
    chosen = torch.randperm(samples, generator=generator, device=device)[:n_masked]
    counts[chosen] = (patches * ratios).long()  # truncation, as int()
    if shape == "random":
        scores = torch.rand(samples, patches, generator=generator, device=device)
        ranks = scores.argsort(dim=1).argsort(dim=1)  # a random order of each sample's patches
        return ranks < counts.unsqueeze(1)
    if shape != "block":
        raise ValueError(f"ibot_masks: shape must be 'block' or 'random', got {shape!r}")
    # Blocks are a scalar loop: it runs on the CPU, seeded from `generator` (one draw, so a
    # resumed step that replays the generator draws the same blocks).
    seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
    rng = np.random.default_rng(seed)
    masks = np.zeros((samples, *grid), dtype=bool)
    for i, target in enumerate(counts.tolist()):
        if target > 0:
            block_mask(masks[i], target, rng)
    return torch.from_numpy(masks.reshape(samples, patches)).to(device)


def block_mask(
    mask: np.ndarray,
    target: int,
    rng: np.random.Generator,
    min_block: int = 4,
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> int:
    """Mask rectangles of `mask` (rows, cols) bool in place until `target` patches are masked;
    returns how many it masked, at most `target` (DINOv2's block masking).

    Each block draws an area uniformly between `min_block` and the patches still to mask, a
    log-uniform aspect ratio in [min_aspect, 1 / min_aspect], and a uniform position; it is kept
    only if it masks at least one new patch and no more new ones than are still to mask, and
    each block gets `attempts` tries. When no try succeeds the masking stops, so a sample can end
    a few patches short of its target (blocks rarely fit the last few exactly); the iBOT loss
    weights each sample by its own masked count, so any count is fine.
    """
    rows, cols = mask.shape
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    masked = 0
    while masked < target:
        budget = target - masked
        added = 0
        for _ in range(attempts):
            u_area, u_aspect, u_top, u_left = rng.random(4)
            # Below min_block patches left, the area lies in [budget, min_block].
            area = min_block + (budget - min_block) * u_area
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if not (h < rows and w < cols):
                continue
            top = int(u_top * (rows - h + 1))  # uniform in [0, rows - h]
            left = int(u_left * (cols - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                added = new
                break
        if added == 0:
            break  # no block fits what is left
        masked += added
    return masked


def ibot_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """iBOT's masked-patch loss: cross-entropy per masked patch, weighted by 1 / (its sample's
    masked patches), summed, over the number of samples (masked or not: DINOv2's division).

    `student_logits`, `targets` (M, K): the masked patches in `masks[masks]` order (sample-major);
    `masks` (samples, patches) bool of every global-crop sample, M of them True.
    """
    ce = torch.sum(-targets * F.log_softmax(student_logits.float() / student_temp, dim=-1), -1)
    weights = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    return (ce * weights).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (DINOv2): -mean log distance of each L2-normalised row to its nearest other row.

    Spreads features uniformly over the sphere; tiny models use it to avoid collapsing.
    """
    x = F.normalize(x, dim=-1, eps=eps)  # (B, D)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)  # never pick yourself
        nearest = sim.argmax(dim=1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()


# Loss ----------------------------------------------------------------------------------------


class DINOLoss(nn.Module):
    """Cross-entropy from the teacher's centred, sharpened targets to the student, and the centre.

    `centering`: "center" subtracts a running centre of the teacher outputs (DINO), and with
    `ibot` a second one of the masked-patch outputs (`ibot_center`); "sinkhorn_knopp" balances
    the teacher's assignments over the global batch instead (DINOv2), and keeps no running centre
    (the `center` buffer stays, unused, so checkpoints keep one layout).
    The maths runs in fp32 whatever the autocast dtype of the head outputs.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        ibot: bool = False,
    ):
        super().__init__()
        if centering not in ("center", "sinkhorn_knopp"):
            raise ValueError(f"centering={centering!r}: use 'center' or 'sinkhorn_knopp'")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        if ibot and centering == "center":  # only then: plain DINO's state_dict is unchanged
            self.register_buffer("ibot_center", torch.zeros(1, out_dim))

    def teacher_targets(
        self,
        teacher_out: Sequence[torch.Tensor],
        teacher_temp: float,
        all_reduce: AllReduce | None = None,
    ) -> list[torch.Tensor]:
        """Centred and sharpened teacher probabilities per global crop: softmax((t - c) / T), or
        Sinkhorn-Knopp over every global crop of the global batch together."""
        if self.centering == "sinkhorn_knopp":
            logits = torch.cat([t.detach() for t in teacher_out])
            q = sinkhorn_knopp(logits, teacher_temp, all_reduce)
            return list(q.split([t.shape[0] for t in teacher_out]))
        center = self.center.float()
        return [
            F.softmax((t.detach().float() - center) / teacher_temp, dim=-1) for t in teacher_out
        ]

    def patch_targets(
        self, teacher_patches: torch.Tensor, teacher_temp: float, all_reduce: AllReduce | None
    ) -> torch.Tensor:
        """iBOT targets (M, K) for the teacher's masked-patch outputs: the patch centre, or
        Sinkhorn-Knopp over the masked patches of the global batch."""
        t = teacher_patches.detach().float()
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(t, teacher_temp, all_reduce)
        return F.softmax((t - self.ibot_center.float()) / teacher_temp, dim=-1)

    def student_log_probs(self, student_out: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """log softmax(s / student_temp) per view."""
        return [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]

    @staticmethod
    def cross_entropy(
        student_log_probs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Mean over pairs (teacher global crop i, student view v != i) of the batch-mean CE.

        Views 0..len(targets)-1 of the student are the same global crops the teacher saw.
        """
        total = student_log_probs[0].new_zeros(())
        pairs = 0
        for i, target in enumerate(targets):
            for v, log_p in enumerate(student_log_probs):
                if v == i:
                    continue  # the same view seen by both networks teaches nothing
                total = total + torch.sum(-target * log_p, dim=-1).mean()
                pairs += 1
        if pairs == 0:
            raise ValueError("DINO needs at least two views (two global crops, or one + locals)")
        return total / pairs

    @torch.no_grad()
    def monitors(
        self, student_log_probs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Collapse monitors (nats, detached 0-d tensors); see the module docstring for reading."""
        probs = torch.cat(list(targets))  # (n_global * B, out_dim)
        teacher_entropy = torch.special.entr(probs).sum(-1).mean()
        mean_entropy = torch.special.entr(probs.mean(0)).sum()
        log_p = torch.cat(list(student_log_probs))  # (n_views * B, out_dim)
        student_entropy = -(log_p.exp() * log_p).sum(-1).mean()
        return {
            "teacher_entropy": teacher_entropy,
            "kl_to_uniform": math.log(self.out_dim) - mean_entropy,
            "student_entropy": student_entropy,
        }

    def forward(
        self,
        student_out: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        teacher_temp: float,
        all_reduce: AllReduce | None = None,
    ) -> dict[str, object]:
        """`{"loss": scalar, "logs": {loss, teacher_entropy, kl_to_uniform, student_entropy}}`."""
        targets = self.teacher_targets(teacher_out, teacher_temp, all_reduce)
        log_probs = self.student_log_probs(student_out)
        loss = self.cross_entropy(log_probs, targets)
        logs = {"loss": loss.detach(), **self.monitors(log_probs, targets)}
        return {"loss": loss, "logs": logs}

    @torch.no_grad()
    def update_center(
        self,
        teacher_out: Sequence[torch.Tensor],
        all_reduce: AllReduce | None = None,
        world_size: int = 1,
    ) -> None:
        """centre <- m * centre + (1 - m) * mean teacher output over all global crops and ranks.

        `all_reduce` sums a tensor over the data-parallel ranks and returns the result (the caller
        wraps `torch.distributed.all_reduce`). Ranks may hold different numbers of samples
        (bucketed batches): the sample count is summed in the same collective as the outputs, so
        every rank divides by the true total and keeps the same centre. `world_size` is kept for
        the callers' signature; the reduced count makes it redundant.
        """
        self._ema_center(self.center, torch.cat(list(teacher_out)), all_reduce)

    @torch.no_grad()
    def update_ibot_center(
        self, teacher_patches: torch.Tensor, all_reduce: AllReduce | None = None
    ) -> None:
        """The patch centre's EMA, as `update_center`, over the masked patches of all ranks."""
        self._ema_center(self.ibot_center, teacher_patches, all_reduce)

    def _ema_center(
        self, center: torch.Tensor, outputs: torch.Tensor, all_reduce: AllReduce | None
    ) -> None:
        outputs = outputs.float()
        # One collective for both: the sum of outputs and, in an extra column, the sample count.
        count = outputs.new_full((1, 1), float(outputs.shape[0]))
        reduced = torch.cat([outputs.sum(0, keepdim=True), count], dim=1)  # (1, out_dim + 1)
        if all_reduce is not None:
            reduced = all_reduce(reduced)
        batch_center = reduced[:, :-1] / reduced[:, -1:].clamp_min(1.0)
        m = self.center_momentum
        center.mul_(m).add_(batch_center.to(center.dtype), alpha=1.0 - m)


# Student -------------------------------------------------------------------------------------


class DINO(nn.Module):
    """The DINO student: backbone + head + loss. The engine wraps this module; the teacher is a
    separate module (`make_teacher`) that the loop runs first and updates after each step.

    With `ibot_weight > 0` it also owns iBOT's `mask_token` (1, D) (student only: the teacher
    never sees masks) and, with `ibot_separate_head`, an `ibot_head` shaped like `head`.
    """

    def __init__(self, backbone: Backbone, cfg: DinoConfig) -> None:
        super().__init__()
        if getattr(backbone, "num_classes", 0):
            raise ValueError("DINO needs a backbone without a classifier (num_classes=0)")
        self.backbone = backbone

        def head() -> DINOHead:
            return DINOHead(
                backbone.embed_dim,
                cfg.out_dim,
                cfg.hidden_dim,
                cfg.bottleneck_dim,
                cfg.norm_last_layer,
                use_bn=cfg.head_bn,
            )

        self.head = head()
        self.ibot_weight = cfg.ibot_weight
        self.ibot_head = head() if self.ibot_weight > 0 and cfg.ibot_separate_head else None
        self.mask_token = (
            nn.Parameter(torch.zeros(1, backbone.embed_dim)) if self.ibot_weight > 0 else None
        )
        self.criterion = DINOLoss(
            cfg.out_dim,
            cfg.student_temp,
            cfg.center_momentum,
            centering=cfg.centering,
            ibot=self.ibot_weight > 0,
        )
        self.koleo_weight = cfg.koleo_weight

    def embed(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student head outputs for every view (globals first, then locals), (B, out_dim) each."""
        return multicrop_embed(self.backbone, self.head, views)

    def forward(
        self,
        views: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        teacher_temp: float,
        masks: Sequence[torch.Tensor] | None = None,
        teacher_patches: torch.Tensor | None = None,
        all_reduce: AllReduce | None = None,
    ) -> dict[str, object]:
        """Loss of the student on all views against the teacher's outputs on the global views,
        plus `koleo_weight` x KoLeo on the backbone features of each global view, plus
        `ibot_weight` x iBOT when `masks` (one (B, N) bool per global view) come with the
        teacher's outputs at those patches (`teacher_patches`, (M, K), `DINOTeacher` order).

        `all_reduce` sums over the data-parallel ranks: Sinkhorn-Knopp centring needs it.
        """
        pooled: list[torch.Tensor] = []
        patches: list[torch.Tensor] = []
        student_out = multicrop_embed(
            self.backbone, self.head, views, pooled, masks, self.mask_token, patches
        )
        out = self.criterion(student_out, teacher_out, teacher_temp, all_reduce)
        if self.koleo_weight > 0:
            koleo = sum(koleo_loss(p) for p in pooled[:2]) / 2
            out["loss"] = out["loss"] + self.koleo_weight * koleo
            out["logs"]["koleo"] = koleo.detach()
        if masks is not None:
            if teacher_patches is None:
                raise ValueError("iBOT masks need the teacher's outputs at the masked patches")
            head = self.head if self.ibot_head is None else self.ibot_head
            student_patches = head(torch.cat(patches))  # (M, K)
            targets = self.criterion.patch_targets(teacher_patches, teacher_temp, all_reduce)
            ibot = ibot_loss(
                student_patches, targets, torch.cat(list(masks)), self.criterion.student_temp
            )
            out["loss"] = out["loss"] + self.ibot_weight * ibot
            out["logs"]["ibot"] = ibot.detach()
        return out

    @torch.no_grad()
    def update_center(
        self,
        teacher_out: Sequence[torch.Tensor],
        all_reduce: AllReduce | None = None,
        world_size: int = 1,
    ) -> None:
        """See `DINOLoss.update_center`; call once per step with the same teacher outputs."""
        self.criterion.update_center(teacher_out, all_reduce, world_size)

    @torch.no_grad()
    def update_ibot_center(
        self, teacher_patches: torch.Tensor, all_reduce: AllReduce | None = None
    ) -> None:
        """See `DINOLoss.update_ibot_center`; once per step, with the step's teacher patches."""
        self.criterion.update_ibot_center(teacher_patches, all_reduce)

    def no_weight_decay(self) -> set[str]:
        """Backbone's no-decay names (prefixed) and the head's 1-D parameters (biases), as in DINO.

        A trainable prototypes magnitude (`norm_last_layer=False`, shape (out_dim, 1)) is decayed.
        """
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        heads = {"head": self.head, "ibot_head": self.ibot_head}
        names |= {
            f"{prefix}.{n}"
            for prefix, head in heads.items()
            if head is not None
            for n, p in head.named_parameters()
            if len(getattr(p, "ds_shape", p.shape)) <= 1  # ZeRO-3 shows partitioned params as (0,)
        }
        if self.mask_token is not None:  # a token, like the backbone's class token
            names.add("mask_token")
        return names


# Teacher -------------------------------------------------------------------------------------


class DINOTeacher(nn.Module):
    """Backbone + head(s) without gradients, always in eval mode; names match the student's."""

    def __init__(
        self, backbone: nn.Module, head: DINOHead, ibot_head: DINOHead | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.ibot_head = ibot_head

    def train(self, mode: bool = True) -> DINOTeacher:
        """The teacher never trains: stays in eval mode whatever the loop asks."""
        return super().train(False)

    def forward(
        self, views: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        """Head outputs per view, as `DINO.embed`; with iBOT `masks` (one per view) also the
        (iBOT) head's outputs at the masked patches of the unmasked views: `(outputs, (M, K))`."""
        if masks is None:
            return multicrop_embed(self.backbone, self.head, views)
        patches: list[torch.Tensor] = []
        out = multicrop_embed(self.backbone, self.head, views, masks=masks, patches_out=patches)
        head = self.head if self.ibot_head is None else self.ibot_head
        return out, head(torch.cat(patches))


def make_teacher(student: DINO) -> DINOTeacher:
    """A copy of the student's backbone and head(s), without gradients, drop path and dropout.

    Call it on the plain student (before any engine wraps or partitions it).
    """
    ibot_head = None if student.ibot_head is None else copy.deepcopy(student.ibot_head)
    teacher = DINOTeacher(copy.deepcopy(student.backbone), copy.deepcopy(student.head), ibot_head)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0  # DropPath: the teacher sees whole networks
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    teacher.requires_grad_(False)
    return teacher.eval()


def ema_parameters(
    teacher: nn.Module, student: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher and student parameters paired by name (teacher names must all be in the student)."""
    student_params = dict(student.named_parameters())
    names = [n for n, _ in teacher.named_parameters()]
    missing = [n for n in names if n not in student_params]
    if missing:
        raise KeyError(f"teacher parameters missing in the student: {missing[:5]}")
    return [p for _, p in teacher.named_parameters()], [student_params[n] for n in names]


def ema_update_(
    teacher_params: Sequence[torch.Tensor],
    student_params: Sequence[torch.Tensor],
    momentum: float,
) -> None:
    """In place, `t = m * t + (1 - m) * s` for each pair, in the teacher tensor's dtype.

    Works on any matching lists: full parameters, or each rank's local ZeRO-3 shards of the fp32
    master weights (then no communication is needed and the result equals a full-tensor EMA).
    """
    teacher = list(teacher_params)
    student = list(student_params)
    if len(teacher) != len(student):
        raise ValueError(f"EMA over {len(teacher)} teacher vs {len(student)} student tensors")
    for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if t.shape != s.shape:
            raise ValueError(f"EMA pair {i}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
    if not teacher:
        return
    with torch.no_grad():
        student = [s.detach().to(dtype=t.dtype) for t, s in zip(teacher, student, strict=True)]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

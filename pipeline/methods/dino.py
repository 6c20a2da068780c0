"""DINO (Caron et al., 2021): self-distillation with a momentum teacher and multi-crop.

This module holds the single-device maths:

- `DINOHead`: MLP -> L2-normalise -> weight-normalised prototypes layer;
- `DINOLoss`: teacher centring + sharpening, the cross-view cross-entropy, the centre EMA and the
  collapse monitors; the centre is a buffer, so it is in every `state_dict` (exact resume);
- `DINO`: the student (backbone + head + loss), the module the engine wraps;
- teacher helpers as plain functions: `make_teacher`, `ema_update_`.

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
) -> list[torch.Tensor]:
    """Head outputs per view, with one backbone call per distinct resolution.

    Views of equal size (the global crops; the local crops) are concatenated along the batch and run
    together, which is what makes multi-crop affordable; the head then runs once over all of them.
    Outputs come back in the order of `views`, each (B_view, out_dim). When `pooled_out` is given,
    the backbone's pooled features per view are appended to it, in the same order.

    Packed views (NaViT: view i of every image in one `PackedBatch`, each image at its own size)
    run as one packed batch of all their rows, one backbone call; image j of view i is row j of
    output i, as unpacked.
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

    The maths runs in fp32 whatever the autocast dtype of the head outputs.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_targets(
        self, teacher_out: Sequence[torch.Tensor], teacher_temp: float
    ) -> list[torch.Tensor]:
        """Centred and sharpened teacher probabilities per global crop: softmax((t - c) / T)."""
        center = self.center.float()
        return [
            F.softmax((t.detach().float() - center) / teacher_temp, dim=-1) for t in teacher_out
        ]

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
    ) -> dict[str, object]:
        """`{"loss": scalar, "logs": {loss, teacher_entropy, kl_to_uniform, student_entropy}}`."""
        targets = self.teacher_targets(teacher_out, teacher_temp)
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
        outputs = torch.cat(list(teacher_out)).float()
        # One collective for both: the sum of outputs and, in an extra column, the sample count.
        count = outputs.new_full((1, 1), float(outputs.shape[0]))
        reduced = torch.cat([outputs.sum(0, keepdim=True), count], dim=1)  # (1, out_dim + 1)
        if all_reduce is not None:
            reduced = all_reduce(reduced)
        batch_center = reduced[:, :-1] / reduced[:, -1:].clamp_min(1.0)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center.to(self.center.dtype), alpha=1.0 - m)


# Student -------------------------------------------------------------------------------------


class DINO(nn.Module):
    """The DINO student: backbone + head + loss. The engine wraps this module; the teacher is a
    separate module (`make_teacher`) that the loop runs first and updates after each step."""

    def __init__(self, backbone: Backbone, cfg: DinoConfig) -> None:
        super().__init__()
        if getattr(backbone, "num_classes", 0):
            raise ValueError("DINO needs a backbone without a classifier (num_classes=0)")
        self.backbone = backbone
        self.head = DINOHead(
            backbone.embed_dim,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.norm_last_layer,
            use_bn=cfg.head_bn,
        )
        self.criterion = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.koleo_weight = cfg.koleo_weight

    def embed(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student head outputs for every view (globals first, then locals), (B, out_dim) each."""
        return multicrop_embed(self.backbone, self.head, views)

    def forward(
        self,
        views: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        teacher_temp: float,
    ) -> dict[str, object]:
        """Loss of the student on all views against the teacher's outputs on the global views,
        plus `koleo_weight` x KoLeo on the backbone features of each global view."""
        pooled: list[torch.Tensor] = []
        out = self.criterion(
            multicrop_embed(self.backbone, self.head, views, pooled), teacher_out, teacher_temp
        )
        if self.koleo_weight > 0:
            koleo = sum(koleo_loss(p) for p in pooled[:2]) / 2
            out["loss"] = out["loss"] + self.koleo_weight * koleo
            out["logs"]["koleo"] = koleo.detach()
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

    def no_weight_decay(self) -> set[str]:
        """Backbone's no-decay names (prefixed) and the head's 1-D parameters (biases), as in DINO.

        A trainable prototypes magnitude (`norm_last_layer=False`, shape (out_dim, 1)) is decayed.
        """
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        names |= {
            f"head.{n}"
            for n, p in self.head.named_parameters()
            if len(getattr(p, "ds_shape", p.shape)) <= 1  # ZeRO-3 shows partitioned params as (0,)
        }
        return names


# Teacher -------------------------------------------------------------------------------------


class DINOTeacher(nn.Module):
    """Backbone + head without gradients, always in eval mode; names match the student's."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def train(self, mode: bool = True) -> DINOTeacher:
        """The teacher never trains: stays in eval mode whatever the loop asks."""
        return super().train(False)

    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Head outputs per view, as `DINO.embed`."""
        return multicrop_embed(self.backbone, self.head, views)


def make_teacher(student: DINO) -> DINOTeacher:
    """A copy of the student's backbone and head, without gradients, drop path and dropout.

    Call it on the plain student (before any engine wraps or partitions it).
    """
    teacher = DINOTeacher(copy.deepcopy(student.backbone), copy.deepcopy(student.head))
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

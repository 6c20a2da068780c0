"""Training objectives behind one small protocol, so the trainer's loop has no method branches:
MAE and DINO pretraining, and fine-tuning a classifier (`ClassifierObjective`).

An objective owns its modules (the student that DeepSpeed wraps, and any module that follows it
without gradients, like DINO's teacher) and answers the loop's questions:

- `param_groups(weight_decay)`: AdamW groups by parameter name (never by `ndim`, which ZeRO-3
  hides), each with its `lr_scale` (layer-wise lr decay when fine-tuning), and
  `lr_scale(group_name, epoch)`: a group's factor at a fractional epoch (DINO's frozen prototypes);
- `backbone`, `crops`: what sizes the loader (input stride; multicrop or one crop per image);
- `prepare(batch, device, dtype, generator)`: a loader batch -> the inputs of `loss`; by default
  `augment(views, generator)`, the device-side augmentation of a batch's uint8 views (tensors, or
  NaViT's `PackedBatch`es: one per view, each image at its own size; the methods take either);
- `attach(engine, ds_config, device)`: anything that needs the built engine (DINO's teacher);
- `loss(engine, views, values, generator)`: the forward of one micro-batch, `{"loss", "logs"}`;
- `after_optimizer_step(engine, values, world_size)`: what moves once per optimizer step (DINO's
  teacher EMA and centre); `at_epoch_end(engine)`: figures to log after an epoch (fine-tuning's
  top-1 on `data.val`);
- `shared_state()` / `load_shared_state(state)`: full, shard-agnostic state saved by rank 0 with
  every checkpoint (the teacher), and `logged_values`: schedule values logged with each step.

`OBJECTIVES` maps `method.name` to its class; `build_objective(recipe)` builds one (the fine-tune
stage builds its `ClassifierObjective` around the pretrained backbone). A new objective is a new
class and a line in that table; the loop does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Recipe
from pipeline.data.device_crops import device_views, to_device
from pipeline.data.packing import PackedBatch, map_images
from pipeline.data.transforms import DeviceAugment, normalize
from pipeline.methods.dino import DINO, ibot_masks, make_teacher
from pipeline.methods.mae import MAE
from pipeline.models import build_backbone
from pipeline.train.distributed import all_reduce_sum
from pipeline.train.teacher import Teacher, build_teacher


def param_groups(
    module: nn.Module,
    weight_decay: float,
    layers: dict[str, int] | None = None,
    layer_scale: Callable[[int], float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups by parameter name: decayed, not decayed, and DINO's prototypes layer; with
    `layers` (name -> layer), one pair per layer, each with its `lr_scale` (layer-wise lr decay:
    `layer_scale(layer)`). Every group carries `lr_scale` (1 without layers).

    The prototypes layer gets a group of its own so it can be frozen (lr 0) for the first
    epoch(s): under ZeRO, gradients live in the engine's buffers, so clearing `p.grad` does not.
    """
    no_decay = module.no_weight_decay()
    groups: dict[str, dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = name not in no_decay
        prefix = "last_layer_" if "head.last_layer" in name else ""
        layer = None if layers is None else layers[name]
        if layer is not None:
            prefix = f"layer{layer:02d}_{prefix}"
        key = prefix + ("decay" if decay else "no_decay")
        scale = 1.0 if layer is None or layer_scale is None else layer_scale(layer)
        group = groups.setdefault(
            key,
            {"params": [], "names": [], "group_name": key, "apply_wd": decay, "lr_scale": scale},
        )
        group["params"].append(p)
        group["names"].append(name)
    for g in groups.values():
        g["weight_decay"] = weight_decay if g["apply_wd"] else 0.0
    return list(groups.values())


def _backbone(recipe: Recipe) -> nn.Module:
    m = recipe.model
    return build_backbone(
        m.backbone,
        drop_path_rate=m.drop_path_rate,
        grad_checkpointing=m.grad_checkpointing,
        **m.overrides,
    )


Views = list[torch.Tensor] | list[PackedBatch]


def _packed(views: Any) -> bool:
    """Whether a batch's views are NaViT packs (a list of `PackedBatch`, one per view)."""
    return isinstance(views, list) and bool(views) and isinstance(views[0], PackedBatch)


class Objective:
    """The protocol's defaults: one student, no followers, nothing saved beside the engine."""

    schedule_config: Any = None  # extra schedules for `Schedules` (DINO's teacher)
    logged_values: tuple[str, ...] = ()

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.student: nn.Module
        self.followers: tuple[nn.Module, ...] = ()  # modules built with the student, no grads

    def modules(self) -> tuple[nn.Module, ...]:
        """Every module the objective built, the student first (for compiling, initialising)."""
        return (self.student, *self.followers)

    @property
    def backbone(self) -> nn.Module:
        """The backbone inside the student (its input stride sizes the loader's crops)."""
        return self.student.backbone

    @property
    def crops(self) -> str:
        """Which crops the loader cuts: "dino" (multicrop) or "mae" (one crop per image)."""
        return self.recipe.method.name

    def prepare(
        self, batch: dict, device: torch.device, dtype: torch.dtype, generator: torch.Generator
    ) -> Any:
        """A loader batch -> the inputs of `loss`: its views on the device, augmented, in the
        compute precision."""
        views = to_device(batch["views"], device)  # uint8 views, or a CropBatch to cut there
        return [v.to(dtype) for v in self.augment(views, generator)]

    def at_epoch_end(self, engine: Any) -> dict[str, float]:
        """Called (collectively) after each epoch's last step; figures to log then."""
        return {}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return param_groups(self.student, weight_decay)

    def lr_scale(self, group_name: str, epoch: float) -> float:
        return 1.0

    def augment(self, views: Any, generator: torch.Generator) -> Views:
        raise NotImplementedError

    def attach(self, engine: Any, ds_config: dict[str, Any], device: torch.device) -> None:
        """Called once the student's engine exists."""

    def loss(
        self, engine: Any, views: list[torch.Tensor], values: dict, generator: torch.Generator
    ) -> dict:
        raise NotImplementedError

    def after_optimizer_step(self, engine: Any, values: dict, world_size: int) -> None:
        """Called after each optimizer step (not after accumulation micro-steps)."""

    def shared_state(self) -> dict[str, dict]:
        return {}

    def load_shared_state(self, shared: dict[str, dict]) -> None:
        """Restore what `shared_state` saved (full tensors, any world size)."""

    def step_flops(self, crops: Any, batch: int) -> int:
        """FLOPs of one training step on `batch` images at the recipe's crops (trace on meta)."""
        raise NotImplementedError


class MAEObjective(Objective):
    """Masked autoencoding: pixels of the hidden patches, from the visible ones."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.student = MAE(_backbone(recipe), recipe.method.mae)
        color = recipe.data.color
        self._mean, self._std = color.mean, color.std

    def augment(self, views: Any, generator: torch.Generator) -> Views:
        # Flips come with the crops; colour augmentation would only blur the pixel target.
        if _packed(views):
            patch = self.student.backbone.patch_size
            return [map_images(v, patch, self._normalize) for v in views]
        return normalize(device_views(views), self._mean, self._std)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize([images], self._mean, self._std)[0]

    def loss(
        self, engine: Any, views: list[torch.Tensor], values: dict, generator: torch.Generator
    ) -> dict:
        return engine(views[0], generator)

    def step_flops(self, crops: Any, batch: int) -> int:
        from pipeline.train.flops import traced_flops

        images = torch.empty(batch, 3, crops.mae_size, crops.mae_size, device="meta")
        return 3 * traced_flops(lambda: self.student(images, None))


class DINOObjective(Objective):
    """Self-distillation with an EMA teacher on multi-crop views, plus DINOv2's parts as the
    recipe asks: KoLeo, iBOT's masked-patch loss on the global crops, Sinkhorn-Knopp centring.

    iBOT's masks are drawn per micro-step from the step's generator (so a resumed step draws the
    same ones), over both global crops together as DINOv2's collate does.
    """

    logged_values = ("momentum", "teacher_temp")

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.schedule_config = recipe.method.dino
        self.student = DINO(_backbone(recipe), recipe.method.dino)
        self.followers = (make_teacher(self.student),)
        self.teacher: Teacher | None = None
        self._augment = DeviceAugment(recipe.data.color, num_global=2)
        self._teacher_out: Sequence[torch.Tensor] = ()
        self._teacher_patches: torch.Tensor | None = None

    def lr_scale(self, group_name: str, epoch: float) -> float:
        # The prototypes stay fixed for the first epochs (DINO's freeze_last_layer).
        frozen = epoch < self.recipe.method.dino.freeze_last_layer_epochs
        return 0.0 if frozen and "last_layer" in group_name else 1.0

    def augment(self, views: Any, generator: torch.Generator) -> Views:
        if _packed(views):  # each view's images, one shape at a time, as that view alone
            patch = self.student.backbone.patch_size
            return [
                map_images(v, patch, lambda x, i=i: self._augment.view(x, i, generator))
                for i, v in enumerate(views)
            ]
        return self._augment(device_views(views), generator)

    def attach(self, engine: Any, ds_config: dict[str, Any], device: torch.device) -> None:
        self.teacher = build_teacher(self.followers[0], engine, ds_config, device)

    def loss(
        self, engine: Any, views: list[torch.Tensor], values: dict, generator: torch.Generator
    ) -> dict:
        cfg = self.recipe.method.dino
        if cfg.ibot_weight == 0:
            self._teacher_out = self.teacher.forward(views[:2])
            if cfg.centering == "center":  # plain DINO: the call as it always was
                return engine(views, self._teacher_out, values["teacher_temp"])
            return engine(
                views, self._teacher_out, values["teacher_temp"], all_reduce=all_reduce_sum
            )
        masks = self._ibot_masks(views[:2], generator)
        self._teacher_out, self._teacher_patches = self.teacher.forward(views[:2], masks)
        return engine(views, self._teacher_out, values["teacher_temp"], masks=masks,
                      teacher_patches=self._teacher_patches, all_reduce=all_reduce_sum)  # fmt: skip

    def _ibot_masks(
        self, global_views: Sequence[torch.Tensor], generator: torch.Generator
    ) -> list[torch.Tensor]:
        """One (B, N) patch mask per global view, drawn over both views' samples together."""
        cfg = self.recipe.method.dino
        shapes = {tuple(v.shape[-2:]) for v in global_views}
        if len(shapes) != 1:
            raise ValueError(f"iBOT needs global crops of one size; got {sorted(shapes)}")
        rows, cols = self.student.backbone.grid_size(*shapes.pop())
        sizes = [v.shape[0] for v in global_views]
        ratio, probability = tuple(cfg.ibot_mask_ratio), cfg.ibot_mask_probability
        masks = ibot_masks(
            sum(sizes), (rows, cols), ratio, probability, generator, shape=cfg.ibot_mask_shape
        )
        return list(masks.split(sizes))

    def after_optimizer_step(self, engine: Any, values: dict, world_size: int) -> None:
        self.teacher.update(values["momentum"])
        if self.recipe.method.dino.centering == "sinkhorn_knopp":
            return  # no running centre to move
        engine.module.update_center(self._teacher_out, all_reduce_sum, world_size)
        if self._teacher_patches is not None:
            engine.module.update_ibot_center(self._teacher_patches, all_reduce_sum)

    def shared_state(self) -> dict[str, dict]:
        return {"teacher": self.teacher.state_dict()}

    def load_shared_state(self, shared: dict[str, dict]) -> None:
        self.teacher.load_state_dict(shared["teacher"])

    def step_flops(self, crops: Any, batch: int) -> int:
        from pipeline.train.flops import traced_flops

        def images(size: int) -> torch.Tensor:
            return torch.empty(batch, 3, size, size, device="meta")

        views = [images(crops.global_size)] * 2 + [images(crops.local_size)] * crops.local_number
        student = traced_flops(lambda: self.student.embed(views))
        teacher = traced_flops(lambda: self.followers[0](views[:2]))
        return 3 * student + teacher


OBJECTIVES: dict[str, type[Objective]] = {"mae": MAEObjective, "dino": DINOObjective}


def build_objective(recipe: Recipe) -> Objective:
    """The objective `method.name` names, with its modules built (seed torch first)."""
    return OBJECTIVES[recipe.method.name](recipe)


class ClassifierObjective(Objective):
    """Fine-tuning: a pretrained backbone with a classifier head, soft-target cross-entropy with
    label smoothing and batch mixup / cutmix, layer-wise lr decay, top-1 on `data.val` at each
    epoch's end. `recipe` is the fine-tune's (train and optim from `eval.finetune`); `source`
    names the starting weights, so a checkpoint of another fine-tune is not continued."""

    def __init__(self, recipe: Recipe, backbone: nn.Module, num_classes: int, source: str) -> None:
        from pipeline.methods.classifier import build_classifier

        super().__init__(recipe)
        self.ft = recipe.eval.finetune
        self.num_classes, self.source = num_classes, source
        self.student = build_classifier(recipe, backbone, num_classes)
        self.dtype = torch.float32
        self.top1: float | None = None  # at the last epoch end this process ran
        self.top5: float | None = None

    @property
    def backbone(self) -> nn.Module:
        return self.student

    @property
    def crops(self) -> str:
        return "mae"  # one random-resized crop per image (the fine-tune's crop keys)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        from pipeline.methods.classifier import layer_ids

        crop = self.recipe.data.eval_crop
        layers, count = layer_ids(self.student, (crop, crop))
        decay = self.ft.layer_decay
        return param_groups(self.student, weight_decay, layers, lambda i: decay ** (count + 1 - i))

    def attach(self, engine: Any, ds_config: dict[str, Any], device: torch.device) -> None:
        if ds_config["bf16"]["enabled"]:
            self.dtype = torch.bfloat16  # the engine holds bf16 weights and takes bf16 inputs
        elif ds_config["fp16"]["enabled"]:
            self.dtype = torch.float16

    def prepare(
        self, batch: dict, device: torch.device, dtype: torch.dtype, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from pipeline.methods.classifier import mix_batch, soft_targets

        labels = batch["label"].to(device)
        if bool((labels < 0).any()):
            raise ValueError("fine-tuning needs labels; data.train.shards holds unlabelled images")
        color = self.recipe.data.color
        images = normalize(device_views(to_device(batch["views"], device)), color.mean, color.std)
        targets = soft_targets(labels, self.num_classes, self.ft.label_smoothing)
        # Mixing draws on the CPU from the step's generator: a resumed run draws the same.
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        rng = np.random.default_rng(seed)
        x, targets = mix_batch(images[0], targets, rng, mixup=self.ft.mixup, cutmix=self.ft.cutmix)
        return x.to(dtype), targets

    def loss(
        self,
        engine: Any,
        inputs: tuple[torch.Tensor, torch.Tensor],
        values: dict,
        generator: torch.Generator,
    ) -> dict:
        from pipeline.methods.classifier import soft_cross_entropy

        x, targets = inputs
        return {"loss": soft_cross_entropy(engine(x), targets), "logs": {}}

    @torch.no_grad()
    def at_epoch_end(self, engine: Any) -> dict[str, float]:
        """Top-1 and top-5 (percent) on `data.val.shards`; every rank scores its share."""
        from pipeline.data.loader import build_eval_loader

        recipe = self.recipe
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        loader = build_eval_loader(recipe.data, recipe.data.val.shards,
                                   batch_size=recipe.eval.batch_size, rank=rank,
                                   world_size=world, seed=recipe.run.seed)  # fmt: skip
        device = next(engine.module.parameters()).device
        counts = torch.zeros(3, dtype=torch.long, device=device)  # top1, top5, images
        color = recipe.data.color
        engine.eval()
        for batch in loader:
            images = batch["views"][0].to(device, non_blocking=True)
            logits = engine(normalize([images], color.mean, color.std)[0].to(self.dtype))
            real = ((batch["id"] >= 0) & (batch["label"] >= 0)).to(device)  # no padding repeats
            target = batch["label"].to(device)
            top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hit = (top == target[:, None]) & real[:, None]
            counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), real.sum()])
        engine.train()
        counts = all_reduce_sum(counts).tolist()
        n = max(counts[2], 1)
        self.top1, self.top5 = 100.0 * counts[0] / n, 100.0 * counts[1] / n
        return {"val_top1": self.top1, "val_top5": self.top5}

    def shared_state(self) -> dict[str, dict]:
        return {"finetune": {"source": self.source}}

    def load_shared_state(self, shared: dict[str, dict]) -> None:
        saved = shared.get("finetune", {}).get("source")
        if saved != self.source:
            raise ValueError(
                f"the fine-tune checkpoint continues another fine-tune (it started from {saved}, "
                f"this one from {self.source}: the backbone or eval.finetune changed); delete "
                f"the run's finetune/ folder to start over"
            )

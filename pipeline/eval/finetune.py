"""Full fine-tuning of a pretrained backbone with a classifier head, through accelerate.

`finetune` reads top to bottom: build (backbone weights + a zero-initialised head, drop path) ->
layer-wise lr decay groups -> accelerate (DDP, or its DeepSpeed plugin when the recipe asks for
ZeRO: deepspeed.zero_stage >= 1) -> resume -> for each step: lr -> device-side mixup/cutmix and
label smoothing -> forward -> backward/step -> log -> checkpoint -> stop; at each epoch end the
top-1 on data.val.shards.

Recipe (MAE/BEiT fine-tuning): AdamW, lr = eval.finetune.lr x global batch / 256, linear warm-up
then cosine to `MIN_LR`; the lr of layer i of L is scaled by layer_decay^(L + 1 - i) (embeddings
0, blocks 1..L in forward order, everything after the last block L + 1); no weight decay on the
backbone's `no_weight_decay()` names; random-resized crops of data.eval_crop (area range
eval.finetune.crop_scale, default DeiT's 0.08-1; aspect ratios eval.finetune.crop_ratio) with
flips (eval.finetune.hflip) on the CPU workers, mixup/cutmix (one draw per batch, switching
50/50 when both are on) and label smoothing in torch ops on the device.

Checkpoints (`run_dir/finetune/checkpoints/step-XXXXXXXX`): every rank writes into one temporary
directory (accelerate's `save_state`: weights, optimizer, RNG states; plus our per-rank loader
position and `meta.json`), then rank 0 renames it into place and moves the `committed` pointer
through a temporary name. A crash at any point leaves the previous checkpoint in use. Randomness
is drawn from generators seeded by (seed, step, rank), so a resumed run continues bitwise.

Not here: feature probes (knn.py, linear.py); a resume at another world size under ZeRO
(DeepSpeed refuses the optimizer shards; DDP checkpoints load at any world size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ColorConfig, FinetuneConfig, Recipe
from pipeline.data.loader import build_eval_loader
from pipeline.data.shards import load_manifest
from pipeline.data.stream import ShardLoader, resolve_shards
from pipeline.data.transforms import MaeCrop, collate_views, normalize
from pipeline.eval.features import make_accelerator, weights_digest
from pipeline.fileio import write_atomic
from pipeline.models import build_backbone
from pipeline.train import safe_load
from pipeline.train.metrics import truncate_metrics
from pipeline.train.preemption import StopFlag
from pipeline.train.schedules import learning_rate, scaled_lr

log = logging.getLogger(__name__)

MIN_LR = 1e-6  # end of the cosine (MAE's fine-tuning default)
MIXUP_SWITCH = 0.5  # probability of cutmix instead of mixup when both are on (timm)
POINTER = "committed"
_TAG = re.compile(r"^step-(\d{8})$")
_BLOCK = re.compile(r"(^|\.)blocks(\.\d+)+$")


# ---------------------------------------------------------------------------------------------
# Model and parameter groups


def num_classes_of(shards: str) -> int:
    """Number of classes from the shards' manifest (a folder, or a pattern with one beside it)."""
    path = Path(shards)
    folder = path if path.is_dir() else Path(resolve_shards(shards)[0].url).parent
    classes = load_manifest(folder).classes
    if not classes:
        raise ValueError(f"{shards}: the manifest lists no classes; fine-tuning needs labels")
    return len(classes)


def build_classifier(recipe: Recipe, backbone: nn.Module, num_classes: int) -> nn.Module:
    """A fresh backbone of the recipe's kind with a classifier head and the fine-tune drop path,
    holding `backbone`'s weights (everything but the head)."""
    m = recipe.model
    model = build_backbone(
        m.backbone,
        num_classes=num_classes,
        drop_path_rate=recipe.eval.finetune.drop_path,
        grad_checkpointing=m.grad_checkpointing,
        **m.overrides,
    )
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(
            f"the backbone does not match model.backbone={m.backbone}: missing "
            f"{[k for k in missing if not k.startswith('head.')]}, unexpected {unexpected}"
        )
    return model


def _leaf_blocks(model: nn.Module) -> list[str]:
    """Names of transformer blocks: `...blocks.i` (ViT, Swin) or `blocks.s.i` (Twins)."""
    modules = dict(model.named_modules())
    return [
        name
        for name, module in modules.items()
        if _BLOCK.search(name)
        and not any(_BLOCK.search(f"{name}.{child}") for child in module._modules)
    ]


@torch.no_grad()
def layer_ids(model: nn.Module, image_hw: tuple[int, int]) -> tuple[dict[str, int], int]:
    """Each parameter's layer for lr decay, and the number of blocks L.

    Found from one forward pass, so it holds for every backbone family: block i (in the order
    blocks run) is layer i + 1; a parameter outside the blocks takes 0 when its module runs
    before the first block (patch embedding, tokens, position tables), else the layer of the
    next block to run (L + 1 after the last: final norm, head).
    """
    blocks = _leaf_blocks(model)
    modules = dict(model.named_modules())
    index: dict[str, int] = {}  # block name -> position in forward order
    seen: dict[str, int] = {}  # module name -> blocks finished when it first ran
    finished = [0]
    hooks = []

    def pre(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            seen.setdefault(name, finished[0])
            if name in blocks and name not in index:
                index[name] = len(index)

        return hook

    def post(module: nn.Module, args: Any, out: Any) -> None:
        finished[0] += 1

    for name, module in modules.items():
        hooks.append(module.register_forward_pre_hook(pre(name)))
        if name in blocks:
            hooks.append(module.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, *image_hw))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    count = len(index)
    ids = {}
    for pname, _ in model.named_parameters():
        owner = next((b for b in blocks if pname.startswith(b + ".")), None)
        if owner is not None and owner in index:
            ids[pname] = index[owner] + 1
            continue
        done = seen.get(pname.rpartition(".")[0], 0)
        ids[pname] = 0 if done == 0 else min(done, count) + 1
    return ids, count


def param_groups(
    model: nn.Module, *, weight_decay: float, layer_decay: float, image_hw: tuple[int, int]
) -> list[dict[str, Any]]:
    """AdamW groups by (layer, decay or not), each with its `lr_scale`; grouped by NAME
    (`no_weight_decay()`), never by ndim (ZeRO-3 hides shapes)."""
    ids, count = layer_ids(model, image_hw)
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = ids[name], name not in no_decay
        g = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (count + 1 - layer),
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# ---------------------------------------------------------------------------------------------
# Targets, mixup, cutmix (torch ops on the device; draws from a numpy generator passed in)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, C) float targets: 1 - smoothing + smoothing / C on the label."""
    off = smoothing / num_classes
    out = torch.full((len(labels), num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    rng: np.random.Generator,
    *,
    mixup: float,
    cutmix: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's batch-mode mixup / cutmix: each image is mixed with the batch flipped.

    images (B, 3, H, W) float, targets (B, C). mixup / cutmix are the Beta alphas (0 = off);
    with both on, cutmix is chosen with probability 0.5. Cutmix's lambda is corrected to the
    pasted box's actual area.
    """
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < MIXUP_SWITCH)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    other = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        images = images * lam + other * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits))."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(root: Path) -> Path | None:
    """The committed checkpoint; else the newest complete one (with meta.json); else None."""
    pointer = root / POINTER
    if pointer.is_file():
        tag = root / pointer.read_text().strip()
        if (tag / "meta.json").is_file():
            return tag
    tags = sorted(p for p in root.glob("step-*") if _TAG.match(p.name))
    complete = [p for p in tags if (p / "meta.json").is_file()]
    return complete[-1] if complete else None


@contextlib.contextmanager
def _quiet(logger: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise `logger`'s level for the duration of the block."""
    log_ = logging.getLogger(logger)
    before = log_.level
    log_.setLevel(max(level, before))
    try:
        yield
    finally:
        log_.setLevel(before)


def save_checkpoint(
    accelerator: Any,
    root: Path,
    step: int,
    loader: ShardLoader,
    keep: int,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Collective: write the step's checkpoint under a temporary name, then commit it.

    `meta` (JSON) goes into the checkpoint's meta.json beside the step and world size."""
    tag = root / f"step-{step:08d}"
    tmp = root / f".{tag.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet("accelerate"):  # 4 INFO lines per save (every epoch) drown the run's own log
        accelerator.save_state(str(tmp))
    torch.save(loader.state_dict(), tmp / f"loader-rank{accelerator.process_index:05d}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = {**(meta or {}), "step": step, "world_size": accelerator.num_processes}
        write_atomic(tmp / "meta.json", json.dumps(record))
        if tag.exists():  # the same step written by an earlier, abandoned attempt
            shutil.rmtree(tag)
        os.replace(tmp, tag)
        write_atomic(root / POINTER, tag.name + "\n")
        for old in sorted(p for p in root.glob("step-*") if _TAG.match(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return tag


def load_checkpoint(
    accelerator: Any, tag: Path, loader: ShardLoader, expect: dict[str, Any] | None = None
) -> int:
    """Collective: restore weights, optimizer, RNG and the loader position; returns the step.

    Every key of `expect` must match the checkpoint's meta.json (the run it continues)."""
    meta = json.loads((tag / "meta.json").read_text())
    for key, value in (expect or {}).items():
        if meta.get(key) != json.loads(
            json.dumps(value)
        ):  # as meta.json holds it: tuples are lists
            raise ValueError(
                f"{tag} was written by another fine-tune ({key} differs: the backbone or "
                f"eval.finetune changed); delete {tag.parent.parent} to start over"
            )
    # accelerate unpickles its files without restriction (its RNG file holds numpy arrays):
    # every file passes the restricted unpickler first, or nothing of the tag is loaded.
    safe_load.check_tree(tag, numpy=True)
    accelerator.load_state(str(tag))
    states = [safe_load.load(tag / f"loader-rank{r:05d}.pt") for r in range(meta["world_size"])]
    loader.load_state_dict(states)
    return int(meta["step"])


# ---------------------------------------------------------------------------------------------
# Training


def deepspeed_config(recipe: Recipe) -> dict[str, Any] | None:
    """accelerate's DeepSpeed plugin config when the recipe asks for ZeRO, else None (DDP)."""
    stage = recipe.deepspeed.zero_stage
    if stage == 0:
        return None
    cuda = torch.cuda.is_available()
    precision = recipe.train.precision if cuda else "fp32"
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": recipe.eval.finetune.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # none, as under DDP (accelerate's plugin would clip at 1.0)
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if recipe.deepspeed.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def _train_loader(recipe: Recipe, rank: int, world_size: int) -> ShardLoader:
    d = recipe.data
    ft = recipe.eval.finetune
    crops = dataclasses.replace(
        d.crops, mae_size=d.eval_crop, mae_scale=ft.crop_scale, ratio=ft.crop_ratio, hflip=ft.hflip
    )
    return ShardLoader(
        d.train.shards,
        transform=MaeCrop(crops),
        collate=collate_views,
        batch_size=recipe.eval.finetune.batch_size,
        rank=rank,
        world_size=world_size,
        seed=recipe.run.seed,
        workers=d.workers,
        mode="exact",
        shuffle_buffer=d.shuffle_buffer,
        max_bad_fraction=d.max_bad_fraction,
    )


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a step needs besides the batch and the step number."""

    ft: FinetuneConfig
    num_classes: int
    seed: int
    rank: int
    color: ColorConfig
    dtype: torch.dtype  # of the model's inputs (bf16/fp16 under DeepSpeed's own precision)


def train_step(
    model: nn.Module, optimizer: Any, accelerator: Any, batch: dict, step: int, ctx: StepContext
) -> torch.Tensor:
    """One optimizer step on one batch (lr already set); returns this rank's loss.

    Drop path and mixing draw from generators seeded by (seed, step, rank): a resumed run
    draws what an uninterrupted one would have drawn.
    """
    ft = ctx.ft
    torch.manual_seed(_seed(ctx.seed, step, ctx.rank, 1))  # drop path uses the global generator
    rng = np.random.default_rng(_seed(ctx.seed, step, ctx.rank, 2))
    labels = batch["label"].to(accelerator.device)
    if bool((labels < 0).any()):
        raise ValueError("fine-tuning needs labels; data.train.shards holds unlabelled images")
    images = batch["views"][0].to(accelerator.device, non_blocking=True)  # (B, 4, H, W) RGBX
    x = normalize([images], ctx.color.mean, ctx.color.std)[0]
    targets = soft_targets(labels, ctx.num_classes, ft.label_smoothing)
    x, targets = mix_batch(x, targets, rng, mixup=ft.mixup, cutmix=ft.cutmix)
    with accelerator.autocast():
        logits = model(x.to(ctx.dtype))
    loss = soft_cross_entropy(logits, targets)
    accelerator.backward(loss)  # under DeepSpeed this also steps the engine
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(
    model: nn.Module, recipe: Recipe, accelerator: Any, dtype: torch.dtype
) -> tuple[float, float]:
    """Top-1 and top-5 (percent) on data.val.shards; every rank runs its share (collective)."""
    loader = build_eval_loader(
        recipe.data,
        recipe.data.val.shards,
        batch_size=recipe.eval.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=recipe.run.seed,
    )
    color = recipe.data.color
    counts = torch.zeros(3, dtype=torch.long, device=accelerator.device)  # top1, top5, images
    model.eval()
    for batch in loader:
        images = batch["views"][0].to(accelerator.device, non_blocking=True)
        x = normalize([images], color.mean, color.std)[0].to(dtype)
        with accelerator.autocast():
            logits = model(x)
        real = (batch["id"] >= 0) & (batch["label"] >= 0)  # no padding repeats, labelled
        real = real.to(accelerator.device)
        target = batch["label"].to(accelerator.device)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = (top == target[:, None]) & real[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), real.sum()])
    model.train()
    counts = accelerator.reduce(counts, reduction="sum").tolist()
    n = max(counts[2], 1)
    return 100.0 * counts[0] / n, 100.0 * counts[1] / n


def finetune(
    recipe: Recipe, backbone: nn.Module, run_dir: Path, *, stop_after: int | None = None
) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) `backbone` on data.train.shards; every rank calls it.

    Returns {"finetune_top1", "finetune_top5", "step", "stopped": None} when done. A stop
    signal (SIGUSR1/SIGTERM/SIGINT) saves the current step and returns {"stopped": signal name,
    "step"}; `stop_after=N` returns after step N without saving, as a killed run (tests).
    """
    ft = recipe.eval.finetune
    run_dir = Path(run_dir)
    root = run_dir / "finetune" / "checkpoints"
    ds_config = deepspeed_config(recipe)
    cuda = torch.cuda.is_available()
    mixed = recipe.train.precision if cuda and recipe.train.precision != "fp32" else "no"
    accelerator = make_accelerator(deepspeed_config=ds_config, mixed_precision=mixed)
    rank, world = accelerator.process_index, accelerator.num_processes
    dtype = torch.float32
    if ds_config is not None and ds_config["bf16"]["enabled"]:
        dtype = torch.bfloat16  # the engine holds bf16 weights and takes bf16 inputs
    elif ds_config is not None and ds_config["fp16"]["enabled"]:
        dtype = torch.float16

    num_classes = num_classes_of(recipe.data.train.shards)
    torch.manual_seed(recipe.run.seed)  # the same head on every rank (zero-initialised anyway)
    model = build_classifier(recipe, backbone, num_classes)
    crop = (recipe.data.eval_crop, recipe.data.eval_crop)
    groups = param_groups(
        model, weight_decay=ft.weight_decay, layer_decay=ft.layer_decay, image_hw=crop
    )
    scales = [g["lr_scale"] for g in groups]
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=0.0,
        betas=recipe.optim.betas,
        eps=recipe.optim.eps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    loader = _train_loader(recipe, rank, world)
    steps_per_epoch = len(loader)
    total = ft.epochs * steps_per_epoch
    global_batch = ft.batch_size * world
    peak = scaled_lr(ft.lr, global_batch)
    warmup = round(ft.warmup_epochs * steps_per_epoch)

    # A checkpoint continues this fine-tune only: same starting weights, same settings.
    meta = {"backbone": weights_digest(backbone), "finetune": dataclasses.asdict(ft)}
    tag = latest_checkpoint(root)
    step = load_checkpoint(accelerator, tag, loader, meta) if tag is not None else 0
    if tag is not None and accelerator.is_main_process:
        log.info("fine-tune: resumed from %s at step %d", tag, step)
    metrics = run_dir / "finetune_metrics.jsonl"
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if step == 0:
            metrics.unlink(missing_ok=True)
        truncate_metrics(metrics, step)  # steps past the checkpoint are trained again

    def record(values: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with metrics.open("a") as f:
                f.write(json.dumps(values) + "\n")

    ctx = StepContext(ft, num_classes, recipe.run.seed, rank, recipe.data.color, dtype)
    stop = StopFlag()
    top1 = top5 = float("nan")
    try:
        while step < total:
            for batch in loader:  # the rest of the current epoch
                lr = learning_rate(
                    step, peak=peak, min_lr=min(MIN_LR, peak), warmup=warmup, total=total
                )
                for group, scale in zip(optimizer.param_groups, scales, strict=True):
                    group["lr"] = lr * scale
                loss = train_step(model, optimizer, accelerator, batch, step, ctx)
                step += 1
                if step % recipe.log.every_steps == 0:
                    mean_loss = accelerator.reduce(loss.float(), reduction="mean")
                    epoch = step / steps_per_epoch
                    record(
                        {"step": step, "epoch": round(epoch, 4), "loss": float(mean_loss), "lr": lr}
                    )
                if stop_after is not None and step >= stop_after:
                    return {"stopped": "stop_after", "step": step}
                if stop.agreed(world):
                    save_checkpoint(accelerator, root, step, loader, recipe.checkpoint.keep, meta)
                    return {"stopped": stop.requested or "another rank", "step": step}
                if step % recipe.checkpoint.every_steps == 0 and step % steps_per_epoch:
                    save_checkpoint(accelerator, root, step, loader, recipe.checkpoint.keep, meta)
            # Epoch end: score, then save (after the score, so a resume never re-scores it).
            top1, top5 = evaluate(model, recipe, accelerator, dtype)
            record(
                {"step": step, "epoch": step // steps_per_epoch, "val_top1": top1, "val_top5": top5}
            )
            save_checkpoint(accelerator, root, step, loader, recipe.checkpoint.keep, meta)
    finally:
        stop.close()
    if math.isnan(top1):  # resumed after the last epoch's checkpoint: score the final weights
        top1, top5 = evaluate(model, recipe, accelerator, dtype)
    result = {"finetune_top1": top1, "finetune_top5": top5, "step": step, "stopped": None}
    if accelerator.is_main_process:
        (run_dir / "finetune.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def finetune_stage(recipe: Recipe, backbone: nn.Module, run_dir: Path) -> dict[str, Any]:
    """Fine-tune and report `finetune_top1` / `finetune_top5` (percent) on data.val.shards.

    When a stop signal ended it early (checkpoint committed), returns {"stopped": name, "step"}
    instead, for the runner to requeue; calling it again resumes.
    """
    result = finetune(recipe, backbone, run_dir)
    if result["stopped"] is not None:
        return {"stopped": result["stopped"], "step": result["step"]}
    return {"finetune_top1": result["finetune_top1"], "finetune_top5": result["finetune_top5"]}

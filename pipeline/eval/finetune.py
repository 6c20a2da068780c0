"""Full fine-tuning of a pretrained backbone with a classifier head, on the pretraining trainer.

`finetune` derives the fine-tune's recipe from `eval.finetune` (`finetune_recipe`: its batch,
epochs, lr, warm-up, weight decay and crops in the train, optim and data sections), builds a
`ClassifierObjective` around the backbone and runs the same `Trainer` as pretraining in
`RUN_DIR/finetune`: one DeepSpeed engine and config builder, one set of parameter groups (the
layer-wise lr decay is each group's `lr_scale`), one checkpoint format (`finetune/checkpoints`,
committed atomically and verified on resume), one resume story (a crash, a stop signal, another
world size), one metrics file (`finetune/metrics.jsonl`, with `val_top1`/`val_top5` at each
epoch's end).

Recipe (MAE/BEiT fine-tuning): AdamW, lr = eval.finetune.lr x global batch / 256, linear warm-up
then cosine to `MIN_LR`, constant weight decay, no clipping; the lr of layer i of L is scaled by
layer_decay^(L + 1 - i) (embeddings 0, blocks 1..L in forward order, everything after the last
block L + 1); no weight decay on the backbone's `no_weight_decay()` names; random-resized crops of
data.eval_crop (eval.finetune.crop_scale, crop_ratio, hflip) on the CPU workers, mixup/cutmix
and label smoothing on the device.

At another world size the fine-tune keeps its global batch: the accumulation is derived from the
committed checkpoint (`eval.finetune.batch_size` x accumulation x ranks stays the same).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Recipe
from pipeline.config_schema import BucketsConfig
from pipeline.data.shards import load_manifest
from pipeline.data.stream import resolve_shards
from pipeline.eval.features import weights_digest
from pipeline.fileio import write_atomic
from pipeline.train.checkpoint import POINTER_FILE, read_commit
from pipeline.train.distributed import DistEnv, env_from_environ, init_distributed
from pipeline.train.engine import Trainer
from pipeline.train.objectives import ClassifierObjective

log = logging.getLogger(__name__)

MIN_LR = 1e-6  # end of the cosine (MAE's fine-tuning default)


def num_classes_of(shards: str) -> int:
    """Number of classes from the shards' manifest (a folder, or a pattern with one beside it)."""
    path = Path(shards)
    folder = path if path.is_dir() else Path(resolve_shards(shards)[0].url).parent
    classes = load_manifest(folder).classes
    if not classes:
        raise ValueError(f"{shards}: the manifest lists no classes; fine-tuning needs labels")
    return len(classes)


def finetune_recipe(recipe: Recipe, grad_accum: int = 1) -> Recipe:
    """The fine-tune as a training recipe: `eval.finetune`'s batch, length, optimiser and crops
    in the sections the trainer reads; the model's drop path is the fine-tune's."""
    ft, d = recipe.eval.finetune, recipe.data
    crops = dataclasses.replace(d.crops, mae_size=d.eval_crop, mae_scale=ft.crop_scale,
                                ratio=ft.crop_ratio, hflip=ft.hflip)  # fmt: skip
    precision = recipe.train.precision if torch.cuda.is_available() else "fp32"
    return dataclasses.replace(
        recipe,
        data=dataclasses.replace(d, crops=crops, buckets=BucketsConfig()),
        model=dataclasses.replace(recipe.model, drop_path_rate=ft.drop_path, init_from=None),
        train=dataclasses.replace(
            recipe.train,
            epochs=ft.epochs,
            steps=None,
            batch_size=ft.batch_size,
            grad_accum=grad_accum,
            precision=precision,
        ),
        optim=dataclasses.replace(
            recipe.optim,
            lr=ft.lr,
            min_lr=MIN_LR,
            weight_decay=ft.weight_decay,
            weight_decay_end=None,
            warmup_epochs=ft.warmup_epochs,
            schedule="cosine",
            clip_grad=0.0,
        ),
    )


def kept_grad_accum(checkpoints: Path, batch_size: int, world_size: int) -> int:
    """The accumulation that keeps the committed fine-tune checkpoint's global batch at this world
    size (1 when there is none); refused when no whole number does."""
    pointer = checkpoints / POINTER_FILE
    if not pointer.is_file():
        return 1
    try:
        record = read_commit(checkpoints / pointer.read_text().strip())
    except Exception:  # unreadable: the trainer picks (or refuses) the checkpoint and says why
        return 1
    saved = record.get("progress", {}).get("global_batch")
    if saved is None or saved == batch_size * world_size:
        return 1
    if saved % (batch_size * world_size):
        raise ValueError(
            f"the fine-tune in {checkpoints} trained with a global batch of {saved} images; "
            f"eval.finetune.batch_size={batch_size} on {world_size} ranks cannot make it up by "
            f"accumulation: set eval.finetune.batch_size so that batch x ranks divides {saved}"
        )
    accum = saved // (batch_size * world_size)
    log.info("fine-tune: %d ranks accumulate %d micro-batches to keep the global batch of %d",
             world_size, accum, saved)  # fmt: skip
    return accum


def finetune(
    recipe: Recipe, backbone: nn.Module, run_dir: Path, env: DistEnv | None = None
) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) `backbone` on data.train.shards; every rank calls it.

    Returns {"finetune_top1", "finetune_top5", "step", "stopped": None} when done. A stop
    signal (SIGUSR1/SIGTERM/SIGINT) commits the current step and returns {"stopped": signal
    name, "step"}; calling it again resumes.
    """
    env = env or env_from_environ()
    init_distributed(env)
    run_dir, ft = Path(run_dir), recipe.eval.finetune
    out = run_dir / "finetune"
    accum = kept_grad_accum(out / "checkpoints", ft.batch_size, env.world_size)
    tuned = finetune_recipe(recipe, accum)
    # A checkpoint continues this fine-tune only: the same starting weights and settings.
    settings = json.dumps(dataclasses.asdict(ft), sort_keys=True)
    source = hashlib.sha256(f"{weights_digest(backbone)} {settings}".encode()).hexdigest()[:16]
    num_classes = num_classes_of(recipe.data.train.shards)
    torch.manual_seed(recipe.run.seed)  # the same head on every rank (zero-initialised anyway)
    objective = ClassifierObjective(tuned, backbone, num_classes, source)
    trainer = Trainer(tuned, env, out, objective=objective)
    done = trainer.fit()
    if done["stopped"] is not None:
        return {"stopped": done["stopped"], "step": done["step"]}
    if objective.top1 is None:  # resumed after the last epoch's checkpoint: score the weights
        objective.at_epoch_end(trainer.engine)
    result = {"finetune_top1": objective.top1, "finetune_top5": objective.top5,
              "step": done["step"], "stopped": None}  # fmt: skip
    if env.is_main:
        write_atomic(run_dir / "finetune.json", json.dumps(result, indent=1) + "\n")
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

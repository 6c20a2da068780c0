"""Resuming on another number of ranks: keep the run's global batch.

Steps, epochs and every schedule of a run (learning rate, weight decay, teacher momentum and
temperature, warm-ups, last-layer freeze) are counted in optimizer steps of one global batch
(`train.batch_size x train.grad_accum x ranks`). A run resumed on another number of ranks keeps
that global batch, so it continues the same curves sample for sample and ends after the same
number of epochs or samples: the per-rank batch stays and `train.grad_accum` absorbs the change
(8 ranks x 32 -> 4 ranks x 32 x 2 accumulation steps). Where no whole accumulation count keeps
it, the launch is refused before anything starts, naming values that do. The trainer checks the
same rule again when it loads the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Recipe, RecipeError, apply_overrides
from pipeline.train.checkpoint import CheckpointManager, read_commit


def saved_global_batch(run_dir: Path) -> tuple[int, int] | None:
    """(global batch, world size) of the run directory's newest committed checkpoint; None
    when there is none, or it predates the record."""
    tag = CheckpointManager(run_dir / "checkpoints", rank=0, world_size=1, verify="size").latest()
    if tag is None:
        return None
    record = read_commit(tag)
    batch = record.get("progress", {}).get("global_batch")
    return None if batch is None else (int(batch), int(record["world_size"]))


def _suggestion(global_batch: int, world_size: int) -> str:
    """A per-rank batch and accumulation count that give `global_batch` on `world_size` ranks."""
    if global_batch % world_size:
        return (
            f"no per-rank batch gives {global_batch} on {world_size} ranks: use a world size that "
            f"divides {global_batch}"
        )
    per_rank = global_batch // world_size
    return f"e.g. train.batch_size={per_rank} train.grad_accum=1"


def keep_global_batch(recipe: Recipe, run_dir: Path, world_size: int) -> tuple[Recipe, str | None]:
    """The recipe to resume `run_dir` with on `world_size` ranks, and a note when it changed.

    Raises RecipeError when the run's global batch cannot be kept with the recipe's per-rank
    batch (the message says what to set)."""
    saved = saved_global_batch(run_dir)
    if saved is None:
        return recipe, None
    global_batch, saved_world = saved
    t = recipe.train
    if t.batch_size * t.grad_accum * world_size == global_batch:
        return recipe, None
    per_step = t.batch_size * world_size
    if global_batch % per_step:
        raise RecipeError(
            f"{run_dir} was trained with a global batch of {global_batch} images per step "
            f"({saved_world} ranks); with train.batch_size={t.batch_size} on {world_size} ranks "
            f"no whole train.grad_accum keeps it ({global_batch} / {per_step} is not whole). "
            f"Keep the global batch: {_suggestion(global_batch, world_size)}."
        )
    accum = global_batch // per_step
    resumed = apply_overrides(recipe, [f"train.grad_accum={accum}"])
    note = (
        f"{run_dir}: keeping the run's global batch of {global_batch} images per step on "
        f"{world_size} rank(s) (it was trained on {saved_world}): train.grad_accum "
        f"{t.grad_accum} -> {accum}"
    )
    return resumed, note

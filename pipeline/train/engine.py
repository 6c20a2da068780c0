"""Training under DeepSpeed: one `Trainer`, one loop, any objective (MAE, DINO, fine-tuning).

`Trainer(recipe, env, run_dir)` builds everything from the recipe (the objective and its modules,
the DeepSpeed engine, the loader, the schedules, the checkpoint manager, the stop handling) and
`fit()` runs the loop, which reads top to bottom: for each step: schedules -> data -> the
objective's inputs (device-side augmentation) -> its loss -> backward/step -> its after-step work
(DINO: teacher EMA and centre) -> log -> (epoch end: its figures) -> checkpoint -> stop. What
differs between objectives lives in `pipeline.train.objectives`; the loop has no method branches.
`train_step` runs one micro-step and is public for benchmarks and tests; `pretrain` is
`Trainer(...).fit()`; the fine-tune stage passes its own objective and run directory.

Precision, ZeRO stage, accumulation and clipping come from the recipe; parameter groups are made
by NAME (never by `ndim`, which ZeRO-3 hides), and their table is printed at start-up. Figures go
through `metrics.py`; stop signals through `preemption.py`: a requested stop saves the current
step on every rank and returns, for the launcher to requeue.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Recipe, recipe_hash, save_recipe
from pipeline.data.loader import build_train_loader
from pipeline.models import compile_blocks
from pipeline.train.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state
from pipeline.train.distributed import DistEnv, all_reduce_sum, every_rank, init_distributed
from pipeline.train.metrics import MetricsWriter, SampleLog, peak_memory_gb
from pipeline.train.objectives import Objective, build_objective, param_groups
from pipeline.train.preemption import StopFlag
from pipeline.train.schedules import Schedules, rewarm_factor
from pipeline.train.weights import init_method, method_weights

log = logging.getLogger(__name__)

__all__ = [
    "StepContext",
    "Trainer",
    "build_method",
    "deepspeed_config",
    "param_group_table",
    "param_groups",
    "pretrain",
    "step_seed",
    "train_step",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Building -------------------------------------------------------------------------------------


def build_method(recipe: Recipe) -> tuple[nn.Module, nn.Module | None]:
    """The student module the engine wraps, and the module that follows it without gradients
    (DINO's teacher; None for MAE), as the recipe's objective builds them."""
    objective = build_objective(recipe)
    return objective.student, (objective.followers[0] if objective.followers else None)


def param_group_table(groups: list[dict[str, Any]], names_file: Path | None = None) -> str:
    """One line per group (name, tensors, parameters, weight decay, lr scale), then what the
    no-decay groups hold, counted by kind (`bias`, `weight` of norms, `pos_embed`, ...).

    The full name list of every group goes to `names_file` (when given; rank 0 passes the run
    directory's `param_groups.txt`): dozens of names on one log line are not read by anyone.
    """
    lines = [f"{'group':<22}{'tensors':>8}{'params':>14}  {'weight decay':<14}lr"]
    kinds: dict[str, int] = {}
    for g in groups:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in g["params"])
        wd = "schedule" if g["apply_wd"] else "0"
        lr = f"x{g.get('lr_scale', 1.0):.3g}"
        lr += ", 0 while frozen" if "last_layer" in g["group_name"] else ""
        lines.append(f"{g['group_name']:<22}{len(g['params']):>8}{n:>14,}  {wd:<14}{lr}")
        if not g["apply_wd"]:
            for name in g["names"]:
                kind = name.rsplit(".", 1)[-1].replace("weight", "1-D weight (norm)")
                kinds[kind] = kinds.get(kind, 0) + 1
    if kinds:
        held = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(kinds.items()))
        lines.append(f"no weight decay on: {held}")
    if names_file is not None:
        from pipeline.fileio import write_atomic

        text = "".join(
            f"[{g['group_name']}] {len(g['names'])} tensors\n"
            + "".join(f"{x}\n" for x in g["names"])
            for g in groups
        )
        names_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(names_file, text)
        lines.append(f"names of every group: {names_file}")
    return "\n".join(lines)


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """DeepSpeed's config, from the recipe's train/optim/deepspeed sections."""
    t, o, ds = recipe.train, recipe.optim, recipe.deepspeed
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.clip_grad,
        "steps_per_print": 10**9,  # we log ourselves
        "zero_optimization": {"stage": ds.zero_stage},
        "optimizer": {
            "type": "AdamW",
            # lr and weight decay are set per step from the schedules.
            "params": {"lr": 0.0, "betas": list(o.betas), "eps": o.eps, "torch_adam": True},
        },
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
    }
    if t.precision != "fp32" and ds.zero_stage >= 1:
        # Accumulate gradients in fp32 whatever the compute precision (bf16 sums drift). ZeRO-0
        # has no such mode; the recipe check allows it only without accumulation.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if ds.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


# One step -------------------------------------------------------------------------------------


@dataclass
class StepContext:
    """What a step needs besides the engine and the batch."""

    objective: Objective
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator
    world_size: int = 1
    nan_policy: str = "stop"


def train_step(engine: Any, batch: dict, values: dict[str, float], ctx: StepContext) -> dict:
    """One micro-step on one batch; returns float logs (empty when the step was skipped).

    The objective's after-step work (DINO: teacher EMA, centre) runs at optimizer-step
    boundaries only.
    """
    inputs = ctx.objective.prepare(batch, ctx.device, ctx.dtype, ctx.generator)
    out = ctx.objective.loss(engine, inputs, values, ctx.generator)
    loss = out["loss"]
    if not every_rank(bool(torch.isfinite(loss))):
        if ctx.nan_policy == "stop":
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {values['step']}; set "
                "train.nan_policy=skip to skip such steps"
            )
        log.warning("skipping step %d: non-finite loss on some rank", values["step"])
        return {}
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    if boundary:
        ctx.objective.after_optimizer_step(engine, values, ctx.world_size)
    logs = {"loss": float(loss.detach())}
    logs.update({k: float(v) for k, v in out["logs"].items()})
    return logs


# The trainer ----------------------------------------------------------------------------------


def _set_schedules(optimizer: Any, values: dict[str, float], scale: Any, epoch: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = values["lr"] * g.get("lr_scale", 1.0) * scale(g["group_name"], epoch)
        g["weight_decay"] = values["wd"] if g["apply_wd"] else 0.0


class Trainer:
    """Training (or its resumption) of `recipe` in `run_dir` on this rank; see the module
    docstring. Building is collective (DeepSpeed, the resume tag); so is `fit`."""

    def __init__(
        self,
        recipe: Recipe,
        env: DistEnv,
        run_dir: Path,
        *,
        objective: Objective | None = None,
        progress: bool = True,
    ) -> None:
        import deepspeed

        self.recipe, self.env, self.run_dir, self.progress = recipe, env, run_dir, progress
        init_distributed(env)
        torch.manual_seed(recipe.run.seed)  # identical initial weights on every rank
        self.objective = objective = objective or build_objective(recipe)
        self.ckpt = CheckpointManager(
            run_dir / "checkpoints",
            rank=env.rank,
            world_size=env.world_size,
            keep=recipe.checkpoint.keep,
            recipe_hash=recipe_hash(recipe),
            verify=recipe.checkpoint.verify,
        )
        resume_tag = _pick_resume_tag(self.ckpt, env)
        if resume_tag is None and recipe.model.init_from:
            # Every rank reads the same file (like the seeded initialisation it replaces).
            source = recipe.model.init_from
            followers = objective.followers[0] if objective.followers else None
            init_method(objective.student, followers, method_weights(Path(source)),
                        ignore=recipe.model.init_from_ignore, source=source)  # fmt: skip
        if recipe.train.compile:
            compiled = sum(compile_blocks(m) for m in objective.modules())
            if env.is_main:
                log.info("train.compile: %d transformer blocks compiled", compiled)
        groups = objective.param_groups(recipe.optim.weight_decay)
        # Before DeepSpeed swaps the groups' tensors for flat ones; the name lists to a file.
        table = param_group_table(groups, run_dir / "param_groups.txt" if env.is_main else None)
        ds_config = deepspeed_config(recipe)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=objective.student, model_parameters=groups, config=ds_config
        )
        if env.is_main:
            log.info("parameter groups:\n%s", table)
        self.ctx = StepContext(
            objective=objective,
            device=env.device,
            dtype=DTYPES[recipe.train.precision],
            generator=torch.Generator(env.device),
            world_size=env.world_size,
            nan_policy=recipe.train.nan_policy,
        )
        objective.attach(self.engine, ds_config, env.device)

        backbone = objective.backbone
        self.loader = build_train_loader(
            recipe.data,
            method=objective.crops,
            stride=backbone.patch_size,
            batch_size=recipe.train.batch_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=recipe.run.seed,
            num_prefix_tokens=getattr(backbone, "num_prefix_tokens", 0),
            agree=every_rank if env.world_size > 1 else None,
        )
        self.steps_per_epoch = steps_per_epoch = max(len(self.loader) // recipe.train.grad_accum, 1)
        self.total = recipe.train.steps or recipe.train.epochs * steps_per_epoch
        self.global_batch = recipe.train.batch_size * recipe.train.grad_accum * env.world_size
        self.sched = Schedules(recipe.optim, objective.schedule_config, steps_per_epoch,
                               self.total, self.global_batch)  # fmt: skip

        self.step, fresh_moments = _resume(self.ckpt, resume_tag, self.engine, self.loader,
                                           objective, env, self.global_batch)  # fmt: skip
        self.rewarm_from = self.step if fresh_moments else None
        if self.rewarm_from is not None and env.is_main:
            log.warning("re-warming the learning rate over %d steps from step %d (fresh AdamW "
                        "moments)", self.sched.rewarm_steps, self.step)  # fmt: skip
        if self.step == 0 and env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "config.yaml")

    def save(self) -> None:
        """Collective: commit a checkpoint of the current step."""
        self.ckpt.save(
            self.engine,
            self.step,
            client_state={
                "step": self.step,
                "epoch": self.loader.epoch,
                "samples": self.step * self.global_batch,
                "global_batch": self.global_batch,
            },
            rank_state={"data": self.loader.state_dict(), "rng": rng_state()},
            shared=self.objective.shared_state() or None,
        )

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to a stop signal); returns `{"step", "total", "run_dir",
        "stopped"}`, `stopped` naming the signal when a stop request ended the run early, after
        a committed checkpoint."""
        recipe, env, sched, objective = self.recipe, self.env, self.sched, self.objective
        writer = MetricsWriter(
            self.run_dir,
            enabled=env.is_main,
            total_steps=self.total,
            start_step=self.step,
            tensorboard=recipe.log.tensorboard,
            progress=self.progress,
        )
        samples = SampleLog(
            self.run_dir,
            env.rank,
            enabled=recipe.log.sample_ids,
            start_step=self.step,
            world_size=env.world_size,
        )
        stop = StopFlag()
        stopped = None
        batches = iter(self.loader)
        packed = recipe.data.buckets.navit
        last = time.perf_counter()
        try:
            while self.step < self.total:
                step = self.step
                values = {"step": step, **sched.at(step)}
                if self.rewarm_from is not None:
                    values["lr"] *= rewarm_factor(step, self.rewarm_from, sched.rewarm_steps)
                _set_schedules(self.optimizer, values, objective.lr_scale, sched.epoch(step))
                self.ctx.generator.manual_seed(step_seed(recipe.run.seed, step, env.rank))
                data_time, ids = 0.0, []
                for _ in range(recipe.train.grad_accum):
                    wait = time.perf_counter()
                    batch = next(batches, None)
                    if batch is None:  # epoch end: the loader starts the next epoch
                        batches = iter(self.loader)
                        batch = next(batches)
                    data_time += time.perf_counter() - wait
                    ids += batch["id"].tolist()
                    logs = train_step(self.engine, batch, values, self.ctx)
                self.step = step = step + 1
                now = time.perf_counter()
                record = None
                images = self.global_batch
                if packed and step % recipe.log.every_steps == 0:
                    # A packed sequence holds a varying number of images: count them (every rank
                    # takes this branch on the same steps, so the collective matches; padding
                    # repeats have negative ids).
                    here = torch.tensor([float(sum(i >= 0 for i in ids))], device=env.device)
                    images = int(all_reduce_sum(here).item())
                if logs and step % recipe.log.every_steps == 0:
                    record = {
                        "step": step,
                        "samples": step * self.global_batch,
                        "epoch": round(sched.epoch(step), 4),
                        **logs,
                        "lr": values["lr"],
                        "wd": values["wd"],
                        "grad_norm": _grad_norm(self.engine),
                        "images_per_s": round(images / (now - last), 2),
                        "data_time": round(data_time, 4),
                        "mem_gb": round(peak_memory_gb(env.device), 3),
                        **{k: values[k] for k in objective.logged_values},
                    }
                    if packed:  # `samples` counts packed sequences there
                        record["images"] = images
                writer.step(step, record)
                if step % self.steps_per_epoch == 0:
                    scores = objective.at_epoch_end(self.engine)
                    if scores:  # logged with the step, before the epoch's checkpoint
                        epoch = step // self.steps_per_epoch
                        writer.step(step, {"step": step, "epoch": epoch, **scores})
                samples.write(step, ids)
                last = now
                if step < self.total and stop.agreed(env.world_size):
                    stopped = stop.requested or "another rank"
                    self.save()
                    log.warning("stopped at step %d on %s; checkpoint committed", step, stopped)
                    break
                if step % recipe.checkpoint.every_steps == 0 or step == self.total:
                    self.save()
        finally:
            stop.close()
            writer.close()
            samples.close()
        return {"step": self.step, "total": self.total, "run_dir": str(self.run_dir),
                "stopped": stopped}  # fmt: skip


def pretrain(
    recipe: Recipe, env: DistEnv, run_dir: Path, *, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the recipe's pretraining in `run_dir`: `Trainer(...).fit()`."""
    return Trainer(recipe, env, run_dir, progress=progress).fit()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's device-side randomness at one step, distinct for every
    (step, rank) of a run at any world size.

    Ranks below 1009 keep the linear mix earlier versions used (so a run resumed after an upgrade
    draws the same augmentations); it would collide from rank 1009 on (step s, rank r+1009 =
    step s+1, rank r), so those ranks take a hash of (seed, step, rank) in a range the linear
    mix never reaches (at or above 2^62)."""
    if rank < 1009:
        return seed * 1_000_003 + step * 1009 + rank
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])
    return (1 << 62) | (mixed >> 2)


def _pick_resume_tag(ckpt: CheckpointManager, env: DistEnv) -> Path | None:
    """Rank 0 picks the checkpoint to resume from (checking it as `checkpoint.verify` says) and
    tells every rank: ranks listing a shared directory on their own can disagree (NFS, Lustre)."""
    choice: list[Any] = [None]
    if env.is_main:
        if ckpt.verify == "size":
            log.info("checking checkpoint file sizes only (checkpoint.verify=size)")
        tag = ckpt.latest()
        choice = [None if tag is None else str(tag)]
    if env.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def _resume(
    ckpt: CheckpointManager,
    tag: Path | None,
    engine: Any,
    loader: Any,
    objective: Objective,
    env: DistEnv,
    global_batch: int,
) -> tuple[int, bool]:
    """Load the committed checkpoint `tag`, if any; returns the step to continue from and whether
    the AdamW moments start afresh (the caller re-warms the learning rate then).

    The global batch (per-rank batch x accumulation x ranks) must be the one the run was trained
    with: steps, epochs and every schedule are counted in it (`tools/launch.py` keeps it across
    a change of world size by adjusting `train.grad_accum`). ZeRO-3 optimizer state cannot move
    to another world size: then the weights, the objective's shared state (the teacher) and the
    data position are loaded, and the optimizer starts afresh (with a warning).
    """
    if tag is None:
        return 0, False
    info = ckpt.commit_info(tag)
    saved_batch = info.get("progress", {}).get("global_batch")
    if saved_batch is not None and saved_batch != global_batch:
        raise CheckpointError(
            f"{tag} was trained with a global batch of {saved_batch} images per step "
            f"(train.batch_size x train.grad_accum x {info['world_size']} ranks); this run has "
            f"{global_batch}. Steps and schedules are counted in the run's global batch: launch "
            f"through tools/launch.py (it adjusts train.grad_accum for a new world size) or set "
            f"train.batch_size x train.grad_accum x ranks = {saved_batch}."
        )
    load_optimizer = not (info["zero_stage"] == 3 and info["world_size"] != env.world_size)
    if not load_optimizer and env.is_main:
        log.warning(
            "%s was saved by %d ZeRO-3 ranks, now %d: loading weights only; AdamW moments "
            "start from zero and the learning rate re-warms",
            tag,
            info["world_size"],
            env.world_size,
        )
    client, rank_states, shared = ckpt.load(engine, tag, load_optimizer=load_optimizer)
    loader.load_state_dict(rank_states.field("data"))
    set_rng_state(rank_states[env.rank]["rng"] if env.rank < len(rank_states) else {})
    if shared:
        objective.load_shared_state(shared)
    if env.is_main:
        log.info("resumed from %s at step %d", tag, client["step"])
    return int(client["step"]), not load_optimizer


def _grad_norm(engine: Any) -> float | None:
    """The global gradient norm DeepSpeed computed at the last step (None where it did not)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return round(float(norm), 5)

"""The one entry point every task runs: a resolved recipe's stages, in order.

    python -m pipeline.stages RUN_DIR/config.yaml [--stage NAME] [key=value ...]

Every rank of a job runs this (the local launcher through torch's elastic agent, the SLURM
launcher through submitit); rank facts come from the environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). The process exits 0 when the stages are done, and
`REQUEUE_EXIT_CODE` when a stop signal ended pretraining early after a committed checkpoint:
running the same command again resumes from it. Under SLURM, rank 0 requeues the job itself when
that signal was the time-limit warning (`pipeline.launch.slurm.requeue_if_timed_out`); a rank
that raises logs the error and the last committed checkpoint and exits at once (`run_task`).

Not here: where the processes come from (`pipeline.launch`), nor what a stage does inside.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from pipeline.config import Recipe, load_recipe
from pipeline.fileio import write_atomic
from pipeline.launch.local import die_with_agent
from pipeline.launch.slurm import adopt_srun_task, requeue_if_timed_out, slurm_job_id
from pipeline.models import build_backbone
from pipeline.train.distributed import (
    DistEnv,
    env_from_environ,
    finish_and_exit,
    init_distributed,
    quiet_third_party,
)
from pipeline.train.preemption import REQUEUE_EXIT_CODE, hold_stop_signals

log = logging.getLogger("pipeline.stages")


def run_dir_of(recipe: Recipe) -> Path:
    """`run.dir / run.name`: where a recipe's run lives."""
    return Path(recipe.run.dir) / recipe.run.name


def run_stages(recipe: Recipe, env: DistEnv, run_dir: Path, stages: list[str] | None = None) -> int:
    """Run `stages` (default: the recipe's) in order; returns the process exit status."""
    from pipeline.train.engine import pretrain

    results_path = run_dir / "results.json"
    for stage in stages or list(recipe.stages):
        if env.is_main:
            log.info("stage %s: %s", stage, run_dir)
        if stage == "pretrain":
            summary = pretrain(recipe, env, run_dir)
            if summary["stopped"]:
                return REQUEUE_EXIT_CODE
            results: dict[str, Any] = {"pretrain_steps": summary["step"]}
        else:
            results = _eval_stage(stage, recipe, env, run_dir)
            if results.get("stopped"):  # fine-tuning stopped on a signal, after a checkpoint
                return REQUEUE_EXIT_CODE
        if env.is_main:
            _merge_results(results_path, {stage: results})
    if env.is_main:
        _plot(run_dir)
    return 0


def run_task(
    recipe: Recipe, env: DistEnv, run_dir: Path, stages: list[str] | None = None
) -> NoReturn:
    """What every rank of a job does (SLURM task or local process): run the stages, then requeue
    at a time limit (SLURM, rank 0) and exit with their status.

    A rank that raises logs it with the last committed checkpoint and exits at once (status 1,
    no teardown, which can hang with a dead peer): `srun --kill-on-bad-exit` or torch's elastic
    agent then ends the other ranks instead of leaving them in a collective until its timeout.
    """
    quiet_third_party()
    try:
        code = run_stages(recipe, env, run_dir, stages)
    except Exception:
        log.critical(
            "rank %d of %d failed; last committed checkpoint: %s",
            env.rank, env.world_size, _last_commit(run_dir), exc_info=True,
        )  # fmt: skip
        logging.shutdown()
        os._exit(1)
    requeue_if_timed_out(code, env.rank)
    # os._exit after a barrier: the interpreter's teardown can abort under ZeRO-3 (see
    # finish_and_exit), and the figures are already in the run directory.
    finish_and_exit(code)


def _last_commit(run_dir: Path) -> str:
    """The committed checkpoint a relaunch resumes from, for failure messages (never raises)."""
    from pipeline.train.checkpoint import POINTER_FILE, validate

    try:
        tag = (run_dir / "checkpoints" / POINTER_FILE).read_text().strip()
        problem = validate(run_dir / "checkpoints" / tag)
    except Exception as e:  # no checkpoint yet, unreadable pointer: say so
        return f"none ({e.__class__.__name__})"
    return str(run_dir / "checkpoints" / tag) + (f" ({problem})" if problem else "")


def _plot(run_dir: Path) -> None:
    """PNG plots of the run; a plotting problem is logged, never fatal to a finished run."""
    from pipeline.eval.plots import plot_run

    try:
        for path in plot_run(run_dir):
            log.info("plot: %s", path)
    except Exception as e:  # the figures are in metrics.jsonl either way
        log.warning("plotting %s failed: %s", run_dir, e)


def evaluated_backbone(recipe: Recipe, run_dir: Path) -> nn.Module:
    """What the evaluation stages measure: `eval.checkpoint` (an export or a checkpoint), else
    this run's newest committed checkpoint, else (a run that did not pretrain, e.g. a fine-tune
    of someone's export) `model.init_from`; the teacher for DINO, the encoder for MAE."""
    from pipeline.eval.export import checkpoint_backbone, load_exported

    source = Path(recipe.eval.checkpoint) if recipe.eval.checkpoint else run_dir
    pretrained_here = (run_dir / "checkpoints" / "committed").is_file()
    if not recipe.eval.checkpoint and recipe.model.init_from and not pretrained_here:
        source = Path(recipe.model.init_from)
    if source.suffix in (".safetensors", ".json"):
        return load_exported(source, recipe.eval.which)
    return checkpoint_backbone(source, recipe.eval.which)


def random_backbone(recipe: Recipe) -> nn.Module:
    """The same backbone at random initialisation (seeded like pretraining's start)."""
    torch.manual_seed(recipe.run.seed)
    return build_backbone(recipe.model.backbone, **recipe.model.overrides)


def baseline_backbone(name: str, recipe: Recipe) -> nn.Module:
    """A baseline of `eval.baselines`: `random_init` or `pixels` (the evaluation crop's pixels)."""
    from pipeline.eval.features import PixelFeatures

    return random_backbone(recipe) if name == "random_init" else PixelFeatures()


def _eval_stage(stage: str, recipe: Recipe, env: DistEnv, run_dir: Path) -> dict[str, Any]:
    """Run one evaluation stage on the pretrained backbone, then on each of `eval.baselines`
    (feature probes only; figures under `<stage>.<baseline>`, caches in `run_dir/<baseline>`)."""
    from pipeline.eval.finetune import finetune_stage
    from pipeline.eval.knn import knn_stage
    from pipeline.eval.linear import linear_stage
    from pipeline.eval.logreg import logreg_stage

    init_distributed(env)
    evaluate = {
        "knn": knn_stage,
        "logreg": logreg_stage,
        "linear": linear_stage,
        "finetune": finetune_stage,
    }[stage]
    figures = evaluate(recipe, evaluated_backbone(recipe, run_dir), run_dir)
    if stage != "finetune":
        for name in recipe.eval.baselines:
            figures[name] = evaluate(recipe, baseline_backbone(name, recipe), run_dir / name)
    return figures


def _merge_results(path: Path, update: dict[str, Any]) -> None:
    """Fold a stage's figures into results.json (atomically; other stages' figures stay)."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(update)
    write_atomic(path, json.dumps(results, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the stages on this rank, exit with their status."""
    die_with_agent()
    p = argparse.ArgumentParser(
        prog="python -m pipeline.stages", description=__doc__.split("\n")[0]
    )
    p.add_argument("config", type=Path, help="a recipe; normally RUN_DIR/config.yaml")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_args(argv)
    if slurm_job_id():  # a task of the hand-written sbatch script (slurm/sbatch_template.sh)
        hold_stop_signals()
        adopt_srun_task()
    env = env_from_environ()
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    recipe = load_recipe(args.config, args.overrides)
    run_task(recipe, env, run_dir_of(recipe), args.stage)


if __name__ == "__main__":
    main()

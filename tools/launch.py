"""Launch a recipe: on SLURM through submitit, or as local processes.

    python tools/launch.py recipes/dino_vitb16.yaml --nodes 8
    python tools/launch.py recipes/debug/dino_tiny.yaml --local --nproc 2 train.steps=50
    python tools/launch.py recipes/dino_vitb16.yaml --nodes 8 --dry-run
    python tools/launch.py recipes/dino_vitb16.yaml --stage knn eval.checkpoint=runs/dino_vitb16

Before anything is written, submitted or started (each failure is one line, exit status 2):
the whole recipe is validated; local or SLURM mode is chosen (`--local`, `launch.local: true`,
or no `sbatch` on PATH mean local; `--nodes` above 1 with local mode is refused); the shard
folders exist and hold a manifest (or the brace pattern's files exist); the run directory
(RUN_DIR = `run.dir/run.name`) is writable; on SLURM, the controller answers `scontrol ping`.
A failing `sbatch` is reported as one line with sbatch's own message (exit status 1).

Run directory: a recipe launched into a RUN_DIR that holds one resumes it, and may differ from it
only in keys that do not change what the checkpoints mean: run.dir, run.name, launch.*, stages,
eval.*, log.*, checkpoint.*, train.epochs / train.steps (a longer run continues from the last
checkpoint), train.batch_size / train.grad_accum (keeping the global batch), train.nan_policy,
data.val.*, data.workers, data.max_bad_fraction, model.grad_checkpointing. Resumed on another
number of ranks (--nproc, --nodes), a run keeps its global batch (train.batch_size x
train.grad_accum x ranks): train.grad_accum is adjusted, and printed; where no whole value keeps
it, the launch is refused saying what to set. Any other difference (model, method, optimizer,
precision, training data, seed) is refused, naming the keys. An accepted recipe replaces
RUN_DIR/config.yaml.

One writer per run directory: RUN_DIR/launch.lock names the SLURM job (or none), host and pid
of the launch that writes there. A launch into a live run is refused naming it; a stale lock
(the job ended, or the local launcher's pid is dead) is taken over with a warning.

The first line printed says which mode runs and why.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import (
    Recipe,
    RecipeError,
    dump_recipe,
    key_source,
    load_recipe,
    recipe_changes,
    save_recipe,
    unsafe_changes,
)
from pipeline.config_schema import STAGES
from pipeline.fileio import write_atomic
from pipeline.launch.lock import RunDirBusy, acquire, check_free, release, set_job
from pipeline.launch.preflight import (
    LaunchError,
    check_controller,
    check_data,
    check_writable,
    submit_checked,
)
from pipeline.launch.slurm import tasks_per_node
from pipeline.launch.world import keep_global_batch

# Launcher options -> recipe keys (the options override `launch.*`).
OPTION_KEYS = {
    "nodes": "launch.nodes",
    "gpus_per_node": "launch.gpus_per_node",
    "cpus_per_task": "launch.cpus_per_task",
    "mem": "launch.mem_gb",
    "partition": "launch.partition",
    "account": "launch.account",
    "time": "launch.time_min",
    "nproc": "launch.nproc",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/launch.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )  # fmt: skip
    p.add_argument("recipe", type=Path)
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", type=int, help="memory per node, GB")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", type=int, help="time limit, minutes")
    p.add_argument("--local", action="store_true", help="run as local processes")
    p.add_argument("--nproc", type=int, help="local processes")
    p.add_argument("--stage", action="append", choices=STAGES, help="run only this stage")
    p.add_argument("--dry-run", action="store_true", help="print, submit nothing")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, key=value")
    return p.parse_intermixed_args(argv)


def resolve(args: argparse.Namespace):
    """The validated recipe with the launcher's options applied (RecipeError if invalid)."""
    overrides = [f"{OPTION_KEYS[k]}={v}" for k, v in vars(args).items()
                 if k in OPTION_KEYS and v is not None]  # fmt: skip
    if args.local:
        overrides.append("launch.local=true")
    return load_recipe(args.recipe, [*overrides, *args.overrides])


def check_run_dir(recipe: Recipe, run_dir: Path) -> dict[str, tuple]:
    """Refuse a run directory that holds a recipe differing in keys outside `RESUMABLE_KEYS`
    (naming them); returns the accepted changes (empty: the same recipe, or a new directory)."""
    existing = run_dir / "config.yaml"
    if not existing.is_file():
        return {}
    try:
        old = load_recipe(existing)
    except RecipeError as e:
        raise RecipeError(f"{existing} cannot be read as a recipe ({e}); move it away") from e
    refused = unsafe_changes(old, recipe)
    if refused:
        shown = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in refused.items())
        raise RecipeError(
            f"{run_dir} holds a run of a different recipe: {shown} differ from {existing}. "
            f"Choose another run.name (e.g. run.name={recipe.run.name}_2) or remove the "
            f"directory to start over; to resume it, change only keys a run may change "
            f"(tools/launch.py --help)."
        )
    return recipe_changes(old, recipe)


def _short(value: object, width: int = 120) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _explicit_nodes(args: argparse.Namespace) -> tuple[str, int] | None:
    """(how it was given, N) when the command line asks for N nodes: --nodes or launch.nodes=."""
    if args.nodes is not None:
        return f"--nodes {args.nodes}", args.nodes
    for item in reversed(args.overrides):
        key, _, value = item.partition("=")
        if key.strip() == "launch.nodes" and value.strip().isdigit():
            return item, int(value)
    return None


def choose_mode(args: argparse.Namespace, recipe: Recipe) -> tuple[bool, str]:
    """(local, why). Refuses (LaunchError) an explicit node count above 1 in local mode."""
    sbatch = shutil.which("sbatch")
    if args.local:
        local, why = True, "--local"
    elif recipe.launch.local:
        where = key_source(args.recipe, "launch.local", args.overrides)
        local, why = True, f"launch.local is true in {where or 'the recipe'}"
    elif sbatch is None:
        local, why = True, "no sbatch on PATH"
    else:
        local, why = False, f"launch.local is false and sbatch is {sbatch}"
    nodes = _explicit_nodes(args)
    if local and nodes and nodes[1] > 1 and not (args.dry_run and why == "no sbatch on PATH"):
        raise LaunchError(
            f"{nodes[0]} asks for SLURM nodes, but local mode runs on this machine only "
            f"({why}): use --nproc N for N local processes, or submit to SLURM "
            f"(launch.local=false, with sbatch on PATH)"
        )
    return local, why


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = resolve(args)
        run_dir = Path(recipe.run.dir) / recipe.run.name
        stages = args.stage or list(recipe.stages)
        local, why = choose_mode(args, recipe)
        check_run_dir(recipe, run_dir)  # another recipe is refused before anything else
        notes: list[str] = []
        if "pretrain" in stages:
            world = recipe.launch.nproc if local else recipe.launch.nodes * tasks_per_node(recipe)
            recipe, note = keep_global_batch(recipe, run_dir, world)
            notes += [note] if note else []
        changes = check_run_dir(recipe, run_dir)
        mode = f"local mode: {why}" if local else f"SLURM mode: {why}"
        if args.dry_run:  # a plan, often made away from the data: checks are reported, not fatal
            print(mode, file=sys.stderr)
            return dry_run(recipe, run_dir, local, why, stages)
        check_data(recipe, stages)
        check_writable(run_dir)
    except (RecipeError, LaunchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if not local:
            check_controller()
        warnings: list[str] = []
        lock = acquire(run_dir, warn=warnings.append)
    except (LaunchError, RunDirBusy, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(mode, file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    for key, (old, new) in changes.items():
        print(f"{run_dir}: {key} changed, {_short(old)} -> {_short(new)}", file=sys.stderr)
    config = run_dir / "config.yaml"
    if local:
        from pipeline.launch.local import run_local

        try:
            save_recipe(recipe, config)
            print(f"running {recipe.launch.nproc} local process(es) in {run_dir}", file=sys.stderr)
            return run_local(config, recipe.launch.nproc, args.stage)
        finally:
            release(run_dir, lock)  # not reached on kill -9: the next launch finds it stale

    previous = config.read_text() if config.is_file() else None
    try:
        save_recipe(recipe, config)  # the job reads it: written before sbatch runs
        job = submit_checked(recipe, run_dir, config, args.stage)
    except BaseException as e:
        # Nothing was submitted: leave the run directory's recipe as it was, so a corrected
        # launch of a new run is not refused as "a different recipe".
        if previous is None:
            config.unlink(missing_ok=True)
        else:
            write_atomic(config, previous)
        release(run_dir, lock)
        if not isinstance(e, LaunchError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    set_job(run_dir, lock, job.job_id)  # the job holds the run directory from now on
    print(f"submitted job {job.job_id}: {recipe.launch.nodes} node(s), stages {stages}")
    print(f"run directory: {run_dir}")
    print(f"logs:          {job.paths.stdout}  /  {job.paths.stderr}")
    print(f"follow:        tail -f {job.paths.stderr}")
    print(f"status:        squeue -j {job.job_id}")
    print(f"cancel:        scancel {job.job_id}")
    return 0


def dry_run(recipe: Recipe, run_dir: Path, local: bool, why: str, stages: list[str]) -> int:
    """Print the resolved recipe and the plan (who holds the run directory, if anyone)."""
    print(dump_recipe(recipe), end="")
    print("---")
    if local and why != "no sbatch on PATH":
        plan = {"mode": "local", "why": why, "nproc": recipe.launch.nproc, "stages": stages}
    else:
        from pipeline.launch.slurm import slurm_parameters

        mode = "local (no sbatch on PATH); on SLURM:" if local else "slurm"
        plan = {"mode": mode, "why": why, "stages": stages, **slurm_parameters(recipe, run_dir)}
    problems = []
    for check in (lambda: check_data(recipe, stages), lambda: check_writable(run_dir)):
        try:
            check()
        except LaunchError as e:
            problems.append(str(e))
    plan["checks"] = problems or "ok"
    try:
        stale = check_free(run_dir)
        plan["lock"] = f"stale, would be taken over: {stale.describe()}" if stale else "free"
    except RunDirBusy as e:
        plan["lock"] = str(e)
    print(json.dumps({"run_dir": str(run_dir), **plan}, indent=2))
    print("dry run: nothing submitted", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

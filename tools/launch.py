"""Launch a recipe: on SLURM through submitit, or as local processes.

    python tools/launch.py recipes/dino_vitb16.yaml --nodes 8
    python tools/launch.py recipes/debug/dino_tiny.yaml --local --nproc 2 train.steps=50
    python tools/launch.py recipes/dino_vitb16.yaml --nodes 8 --dry-run

The whole recipe is validated before anything is submitted or started (an error names the key
and exits with status 2). The resolved recipe goes to RUN_DIR/config.yaml, where RUN_DIR is
`run.dir/run.name`; starting into a run directory that holds a different recipe is refused, the
same recipe resumes. Local mode runs when asked (`--local`, `launch.local: true`) or when there is
no `sbatch` on PATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import RecipeError, dump_recipe, load_recipe, recipe_hash, save_recipe
from pipeline.config_schema import STAGES

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


def check_run_dir(recipe, run_dir: Path) -> None:
    """Refuse a run directory that holds another recipe (the same one resumes)."""
    existing = run_dir / "config.yaml"
    if not existing.is_file():
        return
    try:
        old = load_recipe(existing)
    except RecipeError as e:
        raise RecipeError(f"{existing} cannot be read as a recipe ({e}); move it away") from e
    if recipe_hash(old) != recipe_hash(recipe):
        raise RecipeError(
            f"{run_dir} holds a run of a different recipe ({existing}). Choose another run.name "
            f"(e.g. run.name={recipe.run.name}_2) or remove the directory to start over; to "
            f"resume it, launch with the same recipe and overrides."
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = resolve(args)
        run_dir = Path(recipe.run.dir) / recipe.run.name
        check_run_dir(recipe, run_dir)
    except (RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    no_sbatch = shutil.which("sbatch") is None
    local = recipe.launch.local or no_sbatch
    stages = args.stage or list(recipe.stages)
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        print("---")
        if recipe.launch.local:
            plan = {"mode": "local", "nproc": recipe.launch.nproc, "stages": stages}
        else:
            from pipeline.launch.slurm import slurm_parameters

            mode = "local (no sbatch on PATH); on SLURM:" if no_sbatch else "slurm"
            plan = {"mode": mode, "stages": stages, **slurm_parameters(recipe, run_dir)}
        print(json.dumps({"run_dir": str(run_dir), **plan}, indent=2))
        print("dry run: nothing submitted", file=sys.stderr)
        return 0

    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    save_recipe(recipe, config)
    if local:
        from pipeline.launch.local import run_local

        print(f"running {recipe.launch.nproc} local process(es) in {run_dir}", file=sys.stderr)
        return run_local(config, recipe.launch.nproc, args.stage)

    from pipeline.launch.slurm import submit

    job = submit(recipe, run_dir, config, args.stage)
    print(f"submitted job {job.job_id}: {recipe.launch.nodes} node(s), stages {stages}")
    print(f"run directory: {run_dir}")
    print(f"logs:          {job.paths.stdout}  /  {job.paths.stderr}")
    print(f"follow:        tail -f {job.paths.stderr}")
    print(f"status:        squeue -j {job.job_id}")
    print(f"cancel:        scancel {job.job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

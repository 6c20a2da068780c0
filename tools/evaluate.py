"""Evaluate any weights: a run directory, a checkpoint tag or an exported .safetensors.

    python tools/evaluate.py WEIGHTS --train SHARDS --val SHARDS
        [--protocols knn,logreg,linear,fewshot] [--which teacher|student] [--json F]
        [--nproc N | --nodes N] [--recipe R] [--run-dir DIR] [key=value ...]

Builds the recipe the evaluation stages need and runs it with tools/launch.py (local processes,
or SLURM with --nodes), then prints the report (top-1 of the weights, of the same backbone at
random initialisation and of the raw pixels, per protocol) and writes the run's results.json
to --json. The recipe:
- data and evaluation settings (normalisation, crop sizes, probe grids, baselines, number of
  local processes) come from --recipe, else from the recipe of the run the weights come from
  (a run directory's config.yaml; an export names its checkpoint, whose run directory holds
  one), else from the schema defaults (ImageNet normalisation, 256 -> 224 centre crop). So an
  export and the run directory it was exported from give the same figures;
- the backbone comes from the weights (the export's config, or the run's recipe);
- data.train.shards / data.val.shards from --train / --val (labelled shards), eval.checkpoint
  is WEIGHTS, stages follow --protocols (fewshot: the linear probe with 10 images per class,
  or eval.linear.few_shot from the recipe); key=value overrides go last.
The run directory (default runs/evaluate/<name>-<hash of weights, which and shards>) keeps the
feature caches: running the same command again re-runs the probes on cached features.

Exit status: 0 done (or submitted), 2 bad arguments or weights, else the launcher's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quickstart import quiet_environ  # noqa: E402  (tools/, this script's folder)

from pipeline.eval.plots import MODELS, comparison  # noqa: E402

PROTOCOLS = ("knn", "logreg", "linear", "fewshot")
DEFAULT_SHOTS = 10


def weights_origin(weights: Path) -> tuple[dict[str, Any], Path | None]:
    """(backbone config {backbone, kwargs, method}, the origin run's config.yaml or None)."""
    from pipeline.eval.export import read_exported_config
    from pipeline.train.weights import resolve_checkpoint

    if weights.suffix in (".safetensors", ".json"):
        config = read_exported_config(weights)
        source = Path(config.get("source") or "")
        recipe = source.parent.parent / "config.yaml" if config.get("source") else None
        return config, recipe if recipe is not None and recipe.is_file() else None
    tag = resolve_checkpoint(weights, verify="size")  # the stage verifies contents itself
    recipe_path = tag.parent.parent / "config.yaml"
    data = yaml.safe_load(recipe_path.read_text())
    model = data["model"]
    config = {"backbone": model["backbone"], "kwargs": model.get("overrides") or {},
              "method": data["method"]["name"]}  # fmt: skip
    return config, recipe_path


def build_recipe(args: argparse.Namespace, config: dict[str, Any], base: Path | None) -> dict:
    """The evaluation recipe as plain data (see the module docstring)."""
    data: dict[str, Any] = yaml.safe_load(base.read_text()) if base else {}
    data.pop("base", None)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"--protocols: unknown {unknown}; choose from {', '.join(PROTOCOLS)}")
    stages = [p for p in ("knn", "logreg") if p in protocols]
    if "linear" in protocols or "fewshot" in protocols:
        stages.append("linear")
    ev = data.setdefault("eval", {})
    linear = ev.setdefault("linear", {})
    if "fewshot" in protocols:
        linear["few_shot"] = linear.get("few_shot") or [DEFAULT_SHOTS]
    else:
        linear["few_shot"] = []
    ev["checkpoint"] = str(Path(args.weights).resolve())
    ev["which"] = args.which
    model = data.setdefault("model", {})
    model["backbone"], model["overrides"] = config["backbone"], dict(config["kwargs"])
    data.setdefault("method", {})["name"] = config["method"]
    d = data.setdefault("data", {})
    d.setdefault("train", {})["shards"] = str(Path(args.train).resolve())
    d.setdefault("val", {})["shards"] = str(Path(args.val).resolve())
    run_dir = args.run_dir or ROOT / "runs" / "evaluate" / _run_name(args)
    data["run"] = {**data.get("run", {}), "dir": str(run_dir.parent), "name": run_dir.name}
    data["stages"] = stages
    launch = data.setdefault("launch", {})
    launch["local"] = args.nodes is None
    if args.nodes is not None:
        launch["nodes"] = args.nodes
    if args.nproc is not None:
        launch["nproc"] = args.nproc
    return data


def _run_name(args: argparse.Namespace) -> str:
    weights = Path(args.weights).resolve()
    key = json.dumps([str(weights), args.which, str(Path(args.train).resolve()),
                      str(Path(args.val).resolve())])  # fmt: skip
    stem = weights.stem if weights.suffix else weights.name
    return f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def report(results: dict[str, Any]) -> str:
    """The table: one row per protocol, a column per model (pretrained, random init, pixels)."""
    lines = [f"{'':30}" + "".join(f"{name:>13}" for name, _, _ in MODELS)]
    for label, cells in comparison(results):
        text = "".join(f"{v:>12.1f}%" if v is not None else f"{'-':>13}" for v in cells)
        lines.append(f"{label.replace(chr(10), ' '):30}{text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    p.add_argument("weights", type=Path, metavar="WEIGHTS",
                   help="run directory, checkpoint tag or exported .safetensors")  # fmt: skip
    p.add_argument("--train", required=True, help="labelled shards the probes train on")
    p.add_argument("--val", required=True, help="labelled shards the figures are measured on")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset")
    p.add_argument("--which", choices=("teacher", "student"), help="default: teacher for DINO")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--recipe", type=Path, help="take data and eval settings from this recipe")
    p.add_argument("--run-dir", type=Path, help="where features and figures go")
    p.add_argument("--nproc", type=int, help="local processes (default: the recipe's)")
    p.add_argument("--nodes", type=int, help="run on SLURM with this many nodes")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from pipeline.config import RecipeError, load_recipe
    from pipeline.train.weights import WeightsError

    args = build_parser().parse_intermixed_args(argv)
    os.environ.update(quiet_environ())  # before DeepSpeed is imported (reading a checkpoint)
    try:
        config, origin = weights_origin(args.weights)
        base = args.recipe or origin
        data = build_recipe(args, config, base)
        run_dir = Path(data["run"]["dir"]) / data["run"]["name"]
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        recipe_path = run_dir.parent / f"{run_dir.name}.yaml"
        recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
        load_recipe(recipe_path, args.overrides)  # fail here, naming the key, not in the job
    except (WeightsError, RecipeError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = base or "the schema defaults"
    what = f"{config['backbone']}, {config['method']}"
    print(f"evaluating {args.weights} ({what}) with the settings of {settings}; run directory "
          f"{run_dir}", flush=True)  # fmt: skip
    mode = ["--nodes", str(args.nodes)] if args.nodes is not None else ["--local"]
    code = subprocess.call(
        [sys.executable, str(ROOT / "tools" / "launch.py"), str(recipe_path), *mode,
         *args.overrides],
        cwd=ROOT,
    )  # fmt: skip
    if code != 0 or args.nodes is not None:
        if code == 0:
            print(f"submitted; the figures will be in {run_dir / 'results.json'}")
        return code
    results = json.loads((run_dir / "results.json").read_text())
    print()
    print(report(results))
    if args.json:
        record = {"weights": str(args.weights), "which": args.which, **results}
        args.json.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in default run: DINO on scikit-learn's digits, then probes, baselines and a fine-tune.

    python tools/quickstart.py [--nproc 2] [key=value ...]     (method.name=mae: MAE instead)

1. Writes the digits (1797 8x8 grey images that ship inside scikit-learn, upscaled to 32x32 RGB)
   as labelled train/val shards under runs/data/digits (once).
2. Launches `recipes/quickstart.yaml` on local processes: a tiny ViT pretrained with DINO under
   DeepSpeed ZeRO, then k-NN, logistic regression and the linear probe (full and 10-shot) on it,
   on the same backbone at random initialisation and on the raw pixels, then a fine-tune.
3. Prints a short report: top-1 of pretrained / random init / pixels per protocol, the fine-tune,
   the pretraining loss, images/s, and where the plots and checkpoints are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_recipe  # noqa: E402
from pipeline.data.digits import write_digits_shards  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart.yaml"


def quiet_environ() -> dict[str, str]:
    """This process's environment for the launched ranks: one thread per process (2 processes
    on 2 cores), third-party notices nobody can act on silenced here too (every rank does the
    same when it starts)."""
    from pipeline.train.distributed import quiet_third_party

    quiet_third_party()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


COLUMNS = (("pretrained", None), ("random init", "random_init"), ("pixels", "pixels"))


def comparison_rows(results: dict[str, Any], few_shot: list[int]) -> list[tuple[str, list]]:
    """(label, [pretrained, random init, pixels]) per protocol, figures in percent or None."""
    knn, logreg = results.get("knn", {}), results.get("logreg", {})
    linear, finetune = results.get("linear", {}), results.get("finetune", {})
    rows = [
        ("k-NN top-1 (k=20)", "knn_top1", knn),
        ("logistic regression top-1", "logreg_top1", logreg),
        ("linear probe top-1", "linear_top1", linear),
    ]
    rows += [(f"linear probe top-1, {n}/class", f"linear_top1_{n}shot", linear) for n in few_shot]
    rows.append(("fine-tune top-1", "finetune_top1", finetune))
    out = []
    for label, key, figures in rows:
        cells = [(figures.get(sub, {}) if sub else figures).get(key) for _, sub in COLUMNS]
        if any(v is not None for v in cells):
            out.append((label, cells))
    return out


def report(run_dir: Path, seconds: float) -> str:
    """The quickstart's summary from results.json and metrics.jsonl."""
    results = json.loads((run_dir / "results.json").read_text())
    recipe = load_recipe(run_dir / "config.yaml")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [f"{'':34}" + "".join(f"{name:>13}" for name, _ in COLUMNS)]
    for label, cells in comparison_rows(results, recipe.eval.linear.few_shot):
        text = "".join(f"{v:>12.1f}%" if v is not None else f"{'-':>13}" for v in cells)
        lines.append(f"{label:34}{text}")
    if recipe.method.name == "dino":
        final = sum(m["loss"] for m in metrics[-20:]) / len(metrics[-20:])
        k = recipe.method.dino.out_dim
        lines.append(f"DINO loss, last 20 steps: {final:.3f} (uniform: ln {k} = {math.log(k):.3f})")
    else:
        final = sum(m["loss"] for m in metrics[-20:]) / len(metrics[-20:])
        lines.append(f"MAE loss, last 20 steps: {final:.3f}")
    speed = [m["images_per_s"] for m in metrics[len(metrics) // 10 :]]
    mean_speed = sum(speed) / len(speed)
    lines.append(f"pretraining: {metrics[-1]['step']} steps, {mean_speed:.0f} images/s")
    lines.append(f"wall time:   {seconds / 60:.1f} min")
    lines.append(f"results:     {run_dir / 'results.json'}")
    lines.append(f"plots:       {run_dir / 'plots'}")
    lines.append(f"checkpoints: {run_dir / 'checkpoints'}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="local processes")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = p.parse_args()
    start = time.perf_counter()
    recipe = load_recipe(RECIPE, args.overrides)
    train, val = write_digits_shards(Path(recipe.data.train.shards).parent, size=32)
    print(f"digits shards: {train} and {val}", flush=True)
    code = subprocess.call(
        [sys.executable, str(ROOT / "tools" / "launch.py"), str(RECIPE), "--local",
         "--nproc", str(args.nproc), *args.overrides],
        cwd=ROOT, env=quiet_environ(),
    )  # fmt: skip
    if code != 0:
        print(f"the quickstart run exited with status {code}", file=sys.stderr)
        return code
    print()
    print(report(Path(recipe.run.dir) / recipe.run.name, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())

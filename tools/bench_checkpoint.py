"""Time a checkpoint save and a verified resume pick of a recipe's model, on one process.

    python tools/bench_checkpoint.py recipes/debug/dino_tiny.yaml [--saves 40] [key=value ...]

Builds the recipe's method under DeepSpeed (world size 1; the recipe's ZeRO stage and
precision), then saves `--saves` checkpoints through the same `CheckpointManager` the trainer
uses (DeepSpeed's files, the per-rank and shared states, digests, commit record, pointer,
pruning) and picks the newest one as a resume would (`latest()`: every file's SHA-256 checked).
Prints, and writes to `--json` (default bench_checkpoint.json): median and mean save time (the
first saves are warm-up), bytes per checkpoint, and the verified pick's time. Compare runs of
two versions on the same machine, interleaved, and read the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARMUP = 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_checkpoint.py", description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--saves", type=int, default=40)
    p.add_argument("--json", type=Path, default=Path("bench_checkpoint.json"))
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, key=value")
    args = p.parse_intermixed_args(argv)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29613")

    import deepspeed
    import torch

    from pipeline.config import load_recipe
    from pipeline.train.checkpoint import CheckpointManager, rng_state
    from pipeline.train.engine import build_method, deepspeed_config, param_groups

    recipe = load_recipe(args.recipe, args.overrides)
    torch.manual_seed(recipe.run.seed)
    student, teacher = build_method(recipe)
    engine, *_ = deepspeed.initialize(
        model=student,
        model_parameters=param_groups(student, recipe.optim.weight_decay),
        config=deepspeed_config(recipe),
    )
    shared = None
    if teacher is not None:
        shared = {"teacher": {k: v.detach().clone() for k, v in teacher.state_dict().items()}}
    with tempfile.TemporaryDirectory() as root:
        mgr = CheckpointManager(Path(root), rank=0, world_size=1, keep=2)
        times, cpu = [], []
        for step in range(1, args.saves + WARMUP + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            mgr.save(engine, step, client_state={"step": step}, rank_state={"rng": rng_state()},
                     shared=shared)  # fmt: skip
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        tag = Path(root) / mgr.tag(step)
        size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
        start = time.perf_counter()
        assert mgr.latest() == tag
        pick = time.perf_counter() - start
    kept = times[WARMUP:]
    figures = {
        "recipe": str(args.recipe),
        "overrides": args.overrides,
        "zero_stage": recipe.deepspeed.zero_stage,
        "saves": len(kept),
        "save_median_s": statistics.median(kept),
        "save_mean_s": statistics.mean(kept),
        "save_cpu_median_s": statistics.median(cpu[WARMUP:]),
        "bytes_per_checkpoint": size,
        "verified_pick_s": pick,
    }
    print(json.dumps(figures, indent=1))
    args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

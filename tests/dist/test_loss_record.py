"""MAE and DINO losses on 2 gloo ranks under ZeRO-2 and ZeRO-3, bitwise against a record.

The record (`data/losses.json`) holds the per-step losses (and DINO's teacher entropy) that the
training loop produced before it was restructured: a refactor of the loop must leave them equal
to the last bit. Float results depend on the kernels torch picks for the CPU, so the record is
keyed by a fingerprint (torch and Pillow versions, the CPU capability torch reports); on another
machine the test is skipped with the reason. `PIPELINE_RECORD_LOSSES=1 pytest ...` writes the
record for this machine's fingerprint (do it with the code before a change, never after).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import PIL
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config import load_recipe
from pipeline.train.distributed import finish_and_exit, free_port, rank_environ

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "debug"
RECORD = Path(__file__).resolve().parent / "data" / "losses.json"
STEPS = 6


def fingerprint() -> str:
    cpu = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, Pillow {PIL.__version__}, cpu {cpu}"


def _story(rank: int, world_size: int, port: int, runs: list, root: str) -> None:
    os.environ.update(rank_environ(rank, world_size, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pipeline.train.distributed import DistEnv
    from pipeline.train.engine import pretrain

    for name, recipe_file, overrides in runs:
        recipe = load_recipe(RECIPES / recipe_file, overrides)
        pretrain(recipe, DistEnv(rank, rank, world_size), Path(root) / name, progress=False)
    finish_and_exit()


@pytest.mark.slow
def test_losses_equal_the_record_bitwise(image_shards, tmp_path):
    shards = image_shards(seed=5)
    runs = []
    for method in ("mae", "dino"):
        for stage in (2, 3):
            overrides = [f"data.train.shards={shards}", "data.workers=0", "train.batch_size=8",
                         f"deepspeed.zero_stage={stage}", f"train.steps={STEPS}",
                         "checkpoint.every_steps=3", "log.every_steps=1",
                         "log.tensorboard=false", "optim.warmup_epochs=0"]  # fmt: skip
            runs.append((f"{method}-z{stage}", f"{method}_tiny.yaml", overrides))
    records = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    key = fingerprint()
    recording = os.environ.get("PIPELINE_RECORD_LOSSES") == "1"
    if key not in records and not recording:
        pytest.skip(f"no loss record for this machine ({key}); recorded: {sorted(records)}")

    mp.spawn(_story, args=(2, free_port(), runs, str(tmp_path)), nprocs=2, join=True)
    got = {}
    for name, *_ in runs:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        got[name] = {k: [r.get(k) for r in rows] for k in ("step", "loss", "teacher_entropy")}
    if recording:
        records[key] = got
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps(records, indent=1) + "\n")
        return
    assert got == records[key]

"""tools/evaluate.py as a user runs it: a run directory and its export give the same figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())}


def run(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, env=ENV,
    )  # fmt: skip


@pytest.mark.slow
def test_export_and_run_directory_give_identical_figures(image_shards, tmp_path: Path) -> None:
    train = image_shards(classes=3, size=(40, 40), shard_size=8, seed=5, per_class=16)
    val = image_shards(classes=3, size=(40, 40), shard_size=8, seed=6, per_class=8)
    out = run("launch.py", "recipes/debug/dino_tiny.yaml", "--local", "--nproc", "1",
              f"data.train.shards={train}", f"data.val.shards={val}", f"run.dir={tmp_path}",
              "run.name=r", "train.steps=3", "checkpoint.every_steps=3",
              "stages=[pretrain]")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "r"
    export = tmp_path / "r.safetensors"
    out = run("export.py", str(run_dir), str(export))
    assert out.returncode == 0, out.stderr[-3000:]

    figures = {}
    for name, weights in (("run", run_dir), ("export", export)):
        out = run("evaluate.py", str(weights), "--train", train, "--val", val,
                  "--protocols", "knn,logreg,linear,fewshot",
                  "--json", str(tmp_path / f"{name}.json"),
                  "--run-dir", str(tmp_path / f"eval-{name}"),
                  "eval.logreg.cs=[0.1,1.0]", "eval.linear.few_shot=[2]")  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert "pretrained" in out.stdout and "random init" in out.stdout and "pixels" in out.stdout
        figures[name] = json.loads((tmp_path / f"{name}.json").read_text())
    # The export names its checkpoint, whose run directory's recipe gives the data settings.
    assert "settings of" in out.stdout and str(run_dir / "config.yaml") in out.stdout
    a, b = figures["run"], figures["export"]
    for stage in ("knn", "logreg", "linear"):
        assert a[stage] == b[stage], stage
    assert {"random_init", "pixels"} <= set(a["knn"]) and "linear_top1_2shot" in a["linear"]

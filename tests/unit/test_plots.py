"""Plots of a synthetic run directory: the files exist, are real PNGs, and show something."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import load_recipe, save_recipe
from pipeline.eval.plots import _dino_out_dim, comparison, plot_run, read_jsonl, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


def _dino_records(steps: int = 40) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        records.append(
            {
                "step": step,
                "epoch": round(step / 10, 4),
                "loss": 5.5 - math.log(step),
                "teacher_entropy": 4.0 - 0.05 * step,
                "kl_to_uniform": 0.1 + 0.01 * step,
                "student_entropy": 5.0 - 0.04 * step,
                "lr": 1e-4 * min(step, 10) / 10,
                "wd": 0.04 + 0.001 * step,
                "grad_norm": None if step == 1 else 1.0 / step,  # DeepSpeed has none sometimes
                "images_per_s": 100.0 + step,
                "data_time": 0.01,
                "mem_gb": 0.5,
                "momentum": 0.996 + 0.0001 * step,
                "teacher_temp": 0.04,
            }
        )
    return records


def _write_run(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    # A repeated step (the later record wins) and a torn last line from a killed run.
    lines.append(json.dumps({**records[-1], "loss": 0.5}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 41, "lo')


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))  # axes, lines and text, not a blank canvas
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width > 300 and image.height > 200
        assert sum(1 for n in image.convert("L").histogram() if n) > 10  # not one flat colour


def test_dino_run_with_eval_stages_and_results(tmp_path: Path) -> None:
    run_dir = tmp_path / "dino_run"
    _write_run(run_dir, _dino_records())
    # As the linear probe writes them: the full probe, then a few-shot one, steps from 0 again.
    linear = [
        {"set": tag, "epoch": e, "step": 10 * e, "loss/lr0.01": 2.0 / e, "loss/lr0.1": 1.5 / e}
        for tag in ("full", "8shot")
        for e in (1, 2, 3)
    ]
    (run_dir / "linear_metrics.jsonl").write_text("\n".join(json.dumps(r) for r in linear))
    knn = [{"k": k, "top1": 40 + k / 10, "top5": 60 + k / 10} for k in (10, 20, 100)]
    (run_dir / "knn_metrics.jsonl").write_text("\n".join(json.dumps(r) for r in knn))
    # As the stages write it: each probe's figures, its baselines under their names.
    heads = {
        f"{c}_lr{lr:g}": {"val_top1": 40 + lr + len(c), "test_top1": 41.0}
        for c in ("cls1", "cls4+avg")
        for lr in (0.01, 0.1, 1.0)
    }
    results = {
        "pretrain_steps": 40,
        "knn": {"knn_top1": 41.2, "random_init": {"knn_top1": 20.0}, "pixels": {"knn_top1": 30}},
        "logreg": {
            "logreg_top1": 45.0,
            "logreg_heldout": {"0.1": 40.0, "1": 44.0},
            "pixels": {"logreg_top1": 35.0, "logreg_heldout": {"0.1": 30.0, "1": 33.0}},
        },
        "linear": {
            "linear_top1": 44.0,
            "linear_heads": heads,
            "linear_top1_8shot": 30.0,
            "linear_heads_8shot": heads,
            "random_init": {"linear_top1": 25.0, "linear_top1_8shot": None, "note": "x"},
        },
        "finetune": {"finetune_top1": 50.0},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    save_recipe(load_recipe(ROOT / "recipes" / "debug" / "dino_tiny.yaml"), run_dir / "config.yaml")
    assert _dino_out_dim(run_dir) == 256  # log(256) marked on the collapse monitors

    written = plot_run(run_dir)
    names = sorted(p.name for p in written)
    assert names == [
        "knn_metrics.png", "linear_metrics.png", "probe_sweep.png", "results.png", "train.png"
    ]  # fmt: skip
    rows = comparison(results)
    assert [label for label, _ in rows] == [
        "k-NN", "logistic\nregression", "linear\nprobe", "linear probe\n8/class", "fine-tune"
    ]  # fmt: skip
    assert rows[0][1] == [41.2, 20.0, 30.0] and rows[3][1] == [30.0, None, None]
    for path in written:
        assert path.parent == run_dir / "plots"
        _assert_png(path)
    assert not list((run_dir / "plots").glob(".*"))  # no temporaries left behind


def test_mae_run_without_dino_keys_or_results(tmp_path: Path) -> None:
    records = [
        {"step": s, "epoch": s / 4, "loss": 1.0 / s, "mask_ratio": 0.75, "lr": 1e-4, "wd": 0.05}
        for s in range(1, 9)
    ]
    _write_run(tmp_path / "mae_run", records)
    written = plot_run(tmp_path / "mae_run")
    assert [p.name for p in written] == ["train.png"]
    _assert_png(written[0])


def test_reading_skips_torn_lines_nulls_and_repeats(tmp_path: Path) -> None:
    _write_run(tmp_path, _dino_records(5))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(records) == 6  # 5 steps + the repeated step; the torn line is gone
    xs, ys = series(records, "step", "loss")
    assert xs == [1, 2, 3, 4, 5] and ys[-1] == 0.5
    xs, _ = series(records, "step", "grad_norm")
    assert xs == [2, 3, 4, 5]
    assert series(records, "step", "absent") == ([], [])


def test_nothing_to_plot_and_the_command_line(tmp_path: Path, capsys) -> None:
    assert plot_run(tmp_path) == []
    spec = importlib.util.spec_from_file_location("plot_cli", TOOLS / "plot.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path)]) == 1
    assert "nothing to plot" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "absent")]) == 2
    _write_run(tmp_path / "run", _dino_records(3))
    assert cli.main([str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip().endswith("train.png")


@pytest.mark.parametrize("text", ["[1, 2]", "not json"])
def test_odd_results_file_is_skipped(tmp_path: Path, text: str) -> None:
    (tmp_path / "results.json").write_text(text)
    assert plot_run(tmp_path) == []

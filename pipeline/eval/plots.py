"""A run's figures as PNG files: training curves, evaluation curves and final results.

`plot_run(run_dir)` reads what a run directory holds and writes into `run_dir/plots/`:
- `train.png` from `metrics.jsonl` (one JSON object per logged step): a panel per metric group
  (loss; learning rate; weight decay; DINO's collapse monitors; teacher momentum and temperature;
  gradient norm; throughput; data wait; memory; then one panel for any other numeric key);
- `<stage>_metrics.png` for every `<stage>_metrics.jsonl` an evaluation stage wrote (k-NN,
  linear probe, fine-tuning): its numeric keys against its first key among step/epoch/k/...,
  grouped into loss, accuracy and learning-rate panels;
- `results.png` from `results.json`: a bar per accuracy figure (`*top1*`, `*top5*`, `*acc*`).
Missing files, missing keys, nulls, non-finite values and a torn last line (a run killed while
writing) are skipped; nothing is drawn for what is absent.

Matplotlib is used through its object API (`Figure` + the Agg canvas), never `pyplot`: no global
backend switch, no display needed, safe inside a training process.

Deliberately not here: computing any figure (the engine and the evaluation stages write them),
TensorBoard, and deciding when to plot (the stage runner calls `plot_run` after each run).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.fileio import atomic_file

log = logging.getLogger(__name__)

# Train panels: (title, keys drawn together, log scale). Order is the reading order.
TRAIN_GROUPS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("Loss", ("loss",), False),
    ("Learning rate", ("lr",), False),
    ("Weight decay", ("wd",), False),
    (
        "DINO collapse monitors (nats)",
        ("teacher_entropy", "student_entropy", "kl_to_uniform"),
        False,
    ),
    ("Teacher momentum", ("momentum",), False),
    ("Teacher temperature", ("teacher_temp",), False),
    ("Gradient norm", ("grad_norm",), True),
    ("Throughput (images/s)", ("images_per_s",), False),
    ("Data wait per step (s)", ("data_time",), False),
    ("Peak memory (GiB)", ("mem_gb",), False),
)
X_KEYS = ("step", "epoch", "k", "iteration", "iter")  # first one present is the x axis
SKIP_KEYS = {"step", "epoch", "k", "iteration", "iter", "rank", "world_size"}
SET_KEYS = ("set", "split", "tag")  # a string naming which of several runs a record belongs to
_COLUMNS = 3


# --------------------------------------------------------------------------- reading


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a `.jsonl` file; unreadable lines (a torn last line) are skipped."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s:%d is not JSON; skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (null, strings, bools, nan, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(records: Iterable[dict], x_key: str, key: str) -> tuple[list[float], list[float]]:
    """(x, y) of one key, sorted by x; a repeated x keeps its last record (a resumed run)."""
    points: dict[float, float] = {}
    for record in records:
        x, y = _number(record.get(x_key)), _number(record.get(key))
        if x is not None and y is not None:
            points[x] = y
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def numeric_keys(records: Iterable[dict]) -> list[str]:
    """Keys holding a finite number in some record, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in seen and _number(value) is not None:
                seen[key] = None
    return list(seen)


def _flatten(data: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as {"a.b": value}."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif (number := _number(data)) is not None:
        out[prefix[:-1]] = number
    return out


# --------------------------------------------------------------------------- drawing


Line = tuple[str, list[float], list[float]]  # label, x, y


@dataclass
class Panel:
    """One axes: its title, its lines, a log y axis, and labelled horizontal reference lines."""

    title: str
    lines: list[Line]
    log_y: bool = False
    refs: dict[str, float] = field(default_factory=dict)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend, no display
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def _draw_panels(panels: list[Panel], x_label: str, title: str, path: Path) -> Path:
    rows = math.ceil(len(panels) / _COLUMNS)
    cols = min(len(panels), _COLUMNS)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.4), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        for label, xs, ys in panel.lines:
            marker = "o" if len(xs) < 30 else None  # a few points: show where they are
            ax.plot(xs, ys, label=label, marker=marker, markersize=3, linewidth=1.2)
        for label, y in panel.refs.items():
            ax.axhline(y, color="grey", linestyle="--", linewidth=1.0, label=label)
        if panel.log_y and all(y > 0 for _, _, ys in panel.lines for y in ys):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        if len(panel.lines) + len(panel.refs) > 1:
            ax.legend(fontsize=7 if len(panel.lines) > 6 else 8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, path)


def _lines(records: list[dict], x_key: str, keys: Iterable[str]) -> list:
    lines = []
    for key in keys:
        xs, ys = series(records, x_key, key)
        if xs:
            lines.append((key, xs, ys))
    return lines


def plot_train(
    records: list[dict], path: Path, title: str = "training", out_dim: int | None = None
) -> Path | None:
    """`metrics.jsonl` records -> one figure, a panel per metric group; None if nothing to draw.

    `out_dim` (DINO's prototypes) marks log(out_dim) on the collapse monitors: the value
    `teacher_entropy` reaches on collapse to uniform, and `kl_to_uniform` on collapse to one
    prototype (see `pipeline.methods.dino`).
    """
    panels: list[Panel] = []
    grouped: set[str] = set()
    for panel_title, keys, log_y in TRAIN_GROUPS:
        grouped.update(keys)
        lines = _lines(records, "step", keys)
        if lines:
            refs = {}
            if out_dim and "teacher_entropy" in keys:
                refs = {f"log(out_dim={out_dim})": math.log(out_dim)}
            panels.append(Panel(panel_title, lines, log_y, refs))
    for key in numeric_keys(records):  # keys this module does not know yet still get drawn
        if key not in grouped and key not in SKIP_KEYS:
            lines = _lines(records, "step", [key])
            if lines:
                panels.append(Panel(key, lines))
    if not panels:
        return None
    return _draw_panels(panels, "step", title, path)


def _eval_group(key: str) -> str:
    lowered = key.lower()
    if "loss" in lowered:
        return "loss"
    if any(word in lowered for word in ("top1", "top5", "acc")):
        return "accuracy"
    if lowered == "lr" or lowered.endswith("_lr") or "learning_rate" in lowered:
        return "learning rate"
    return key


def plot_eval(records: list[dict], path: Path, title: str) -> Path | None:
    """An evaluation stage's records -> losses, accuracies and learning rates against the first
    of step/epoch/k/... the records carry; any other numeric key gets its own panel.

    Records of several runs in one file, told apart by a `set`/`split`/`tag` string (the linear
    probe's full and few-shot heads), are drawn as separate lines labelled `key [set]`.
    """
    x_key = next((k for k in X_KEYS if any(_number(r.get(k)) is not None for r in records)), None)
    if x_key is None:
        return None
    by_set: dict[str, list[dict]] = {}
    for record in records:
        label = next((str(record[k]) for k in SET_KEYS if isinstance(record.get(k), str)), "")
        by_set.setdefault(label, []).append(record)
    groups: dict[str, list[str]] = {}
    for key in numeric_keys(records):
        if key not in SKIP_KEYS:
            groups.setdefault(_eval_group(key), []).append(key)
    panels: list[Panel] = []
    for group, keys in groups.items():
        lines = []
        for label, subset in by_set.items():
            suffix = f" [{label}]" if label and len(by_set) > 1 else ""
            lines += [(k + suffix, xs, ys) for k, xs, ys in _lines(subset, x_key, keys)]
        if lines:
            panel_title = group[:1].upper() + group[1:]
            panels.append(Panel(panel_title, lines, log_y=group == "loss" and len(lines) == 1))
    if not panels:
        return None
    return _draw_panels(panels, x_key, title, path)


def plot_results(results: dict, path: Path, title: str = "results") -> Path | None:
    """`results.json` -> a horizontal bar per accuracy figure (nested keys joined by dots)."""
    figures = {
        k: v
        for k, v in _flatten(results).items()
        if any(word in k.lower() for word in ("top1", "top5", "acc"))
    }
    if not figures:
        return None
    fig = Figure(figsize=(7.0, 0.45 * len(figures) + 1.2), layout="constrained")
    ax = fig.subplots()
    names = list(figures)
    bars = ax.barh(names, [figures[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.invert_yaxis()  # first key on top, as in the file
    ax.set_xlabel("accuracy")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- entry point


def _dino_out_dim(run_dir: Path) -> int | None:
    """DINO's `method.dino.out_dim` from the run's resolved recipe, if it is a DINO run.

    Read as plain YAML: a plot must not fail on a recipe an older schema wrote.
    """
    try:
        recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
        method = recipe["method"]
        return int(method["dino"]["out_dim"]) if method["name"] == "dino" else None
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def plot_run(run_dir: Path) -> list[Path]:
    """Render a run directory's metrics and results to PNGs in `run_dir/plots/`; returns them.

    Reads `metrics.jsonl`, every `*_metrics.jsonl` and `results.json`, whichever exist; returns
    an empty list when none of them has anything to draw.
    """
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    name = run_dir.name
    written: list[Path] = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = read_jsonl(metrics)
        title = f"{name}: training"
        path = plot_train(records, out / "train.png", title, _dino_out_dim(run_dir))
        written += [path] if path else []
    for stage_file in sorted(run_dir.glob("*_metrics.jsonl")):
        stage = stage_file.name.removesuffix("_metrics.jsonl")
        path = plot_eval(read_jsonl(stage_file), out / f"{stage_file.stem}.png", f"{name}: {stage}")
        written += [path] if path else []
    results = run_dir / "results.json"
    if results.is_file():
        try:
            data = json.loads(results.read_text())
        except ValueError as e:
            log.warning("%s is not JSON (%s); no results plot", results, e)
        else:
            path = plot_results(data, out / "results.png", f"{name}: results")
            written += [path] if path else []
    return written

"""A run's figures as PNG files: training curves, evaluation curves and final results.

`plot_run(run_dir)` reads what a run directory holds and writes into `run_dir/plots/`:
- `train.png` from `metrics.jsonl` (one JSON object per logged step): a panel per metric group
  (loss; learning rate; weight decay; DINO's collapse monitors; teacher momentum and temperature;
  gradient norm; throughput; data wait; memory; then one panel for any other numeric key);
- `<stage>_metrics.png` for every `<stage>_metrics.jsonl` an evaluation stage wrote (k-NN,
  linear probe, fine-tuning): its numeric keys against its first key among step/epoch/k/...,
  grouped into loss, accuracy and learning-rate panels;
- `results.png` from `results.json`: one grouped bar chart, top-1 per protocol (k-NN, logistic
  regression, linear probe, few-shot, fine-tune) for the pretrained backbone and its baselines
  (random init, pixels);
- `probe_sweep.png` from `results.json`: held-out top-1 of every linear head against its
  learning rate (a line per feature choice, a panel per model and training set), and of the
  logistic regression against C.
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
MAX_LEGEND = 10  # more lines than this: no legend (it would cover the axes); the title counts


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
    x_log: bool = False
    x_label: str | None = None  # None: the figure's x label


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend, no display
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def _draw_panels(
    panels: list[Panel], x_label: str, title: str, path: Path, y_label: str | None = None
) -> Path:
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
        values = [y for _, _, ys in panel.lines for y in ys]
        if panel.log_y and values and min(values) > 0:
            ax.set_yscale("log")
        elif panel.log_y and values and min(values) == 0 and max(values) > 0:
            # Losses rounded to 0 (a head that fits its few shots): log above the smallest one.
            ax.set_yscale("symlog", linthresh=min(y for y in values if y > 0))
        if panel.x_log:
            ax.set_xscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.x_label or x_label)
        if y_label:
            ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        if 1 < len(panel.lines) + len(panel.refs) <= MAX_LEGEND:
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
        panel_title = group[:1].upper() + group[1:]
        # One panel per set (full probe, few-shot): their step counts differ, and one panel of
        # every head of every set is a tangle (the linear probe trains dozens of heads).
        for label, subset in by_set.items():
            lines = _lines(subset, x_key, keys)
            if lines:
                name = f"{panel_title} [{label}]" if label and len(by_set) > 1 else panel_title
                if len(lines) > MAX_LEGEND:
                    name += f": {len(lines)} heads"
                panels.append(Panel(name, lines, log_y=group == "loss"))
    if not panels:
        return None
    return _draw_panels(panels, x_key, title, path)


# Protocols of results.json: (label, stage, key); the few-shot rows are found by their suffix.
PROTOCOLS: tuple[tuple[str, str, str], ...] = (
    ("k-NN", "knn", "knn_top1"),
    ("logistic\nregression", "logreg", "logreg_top1"),
    ("linear\nprobe", "linear", "linear_top1"),
)
MODELS: tuple[tuple[str, str | None, str], ...] = (
    ("pretrained", None, "tab:blue"),
    ("random init", "random_init", "tab:grey"),
    ("pixels", "pixels", "tab:orange"),
)


def comparison(results: dict) -> list[tuple[str, list[float | None]]]:
    """(protocol label, [pretrained, random init, pixels] top-1) for every protocol present:
    k-NN, logistic regression, linear probe, each few-shot linear probe, fine-tune."""
    if not isinstance(results, dict):
        return []
    rows = list(PROTOCOLS)
    linear = results.get("linear", {}) if isinstance(results.get("linear"), dict) else {}
    for key in sorted(k for k in linear if k.startswith("linear_top1_") and k.endswith("shot")):
        shots = key.removeprefix("linear_top1_").removesuffix("shot")
        rows.append((f"linear probe\n{shots}/class", "linear", key))
    rows.append(("fine-tune", "finetune", "finetune_top1"))
    out = []
    for label, stage, key in rows:
        figures = results.get(stage)
        if not isinstance(figures, dict):
            continue
        cells = [
            _number((figures.get(sub, {}) if sub else figures).get(key)) for _, sub, _ in MODELS
        ]
        if any(v is not None for v in cells):
            out.append((label, cells))
    return out


def plot_results(results: dict, path: Path, title: str = "results") -> Path | None:
    """`results.json` -> one grouped bar chart: top-1 per protocol for the pretrained backbone
    and its baselines (random init, pixels), each bar labelled with its value."""
    rows = comparison(results)
    if not rows:
        return None
    present = [i for i in range(len(MODELS)) if any(cells[i] is not None for _, cells in rows)]
    width = 0.8 / len(present)
    fig = Figure(figsize=(max(6.0, 1.5 * len(rows) + 1.5), 4.2), layout="constrained")
    ax = fig.subplots()
    for slot, i in enumerate(present):
        name, _, color = MODELS[i]
        xs = [r + (slot - (len(present) - 1) / 2) * width for r in range(len(rows))]
        ys = [cells[i] if cells[i] is not None else 0.0 for _, cells in rows]
        bars = ax.bar(xs, ys, width, label=name, color=color)
        labels = [f"{cells[i]:.1f}" if cells[i] is not None else "" for _, cells in rows]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=9)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _head_lr(name: str) -> tuple[str, float] | None:
    """`cls4+avg_lr0.03` -> ("cls4+avg", 0.03)."""
    choice, sep, lr = name.rpartition("_lr")
    try:
        return (choice, float(lr)) if sep else None
    except ValueError:
        return None


def plot_sweep(results: dict, path: Path, title: str = "probe sweep") -> Path | None:
    """The probes' hyper-parameter sweeps from `results.json`: for each model (pretrained,
    random init, pixels) and training set (full, few-shot), held-out top-1 of every linear head
    against its learning rate, one line per feature choice; and the logistic regression's
    held-out top-1 against C, one line per model."""
    if not isinstance(results, dict):
        return None
    panels: list[Panel] = []
    linear, logreg = results.get("linear"), results.get("logreg")
    for name, sub, _ in MODELS:
        figures = (linear.get(sub) if sub else linear) if isinstance(linear, dict) else None
        if not isinstance(figures, dict):
            continue
        for key in sorted(k for k in figures if k.startswith("linear_heads")):
            suffix = key.removeprefix("linear_heads").lstrip("_") or "full"
            curves: dict[str, dict[float, float]] = {}
            for head, scores in figures[key].items():
                parsed = _head_lr(head)
                value = _number(scores.get("val_top1")) if isinstance(scores, dict) else None
                if parsed and value is not None:
                    curves.setdefault(parsed[0], {})[parsed[1]] = value
            # Sorted choices: a feature choice keeps its colour from panel to panel.
            lines = [(c, sorted(p), [p[x] for x in sorted(p)]) for c, p in sorted(curves.items())]
            if lines:
                panels.append(Panel(f"linear heads: {name}, {suffix}", lines, x_log=True))
    if isinstance(logreg, dict):
        lines = []
        for name, sub, _ in MODELS:
            figures = logreg.get(sub) if sub else logreg
            held = figures.get("logreg_heldout") if isinstance(figures, dict) else None
            if isinstance(held, dict):
                points = {float(c): v for c, v in held.items() if _number(v) is not None}
                lines.append((name, sorted(points), [points[c] for c in sorted(points)]))
        if lines:
            panels.append(Panel("logistic regression", lines, x_log=True, x_label="C"))
    if not panels:
        return None
    return _draw_panels(
        panels, "learning rate (per 256)", title, path, y_label="held-out top-1 (%)"
    )


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
            path = plot_results(data, out / "results.png", f"{name}: top-1 by protocol")
            written += [path] if path else []
            path = plot_sweep(data, out / "probe_sweep.png", f"{name}: probe hyper-parameters")
            written += [path] if path else []
    return written

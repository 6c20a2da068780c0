"""Render a run directory's metrics and results to PNG files.

    python tools/plot.py RUN_DIR

Reads RUN_DIR/metrics.jsonl, RUN_DIR/*_metrics.jsonl and RUN_DIR/results.json (whichever exist)
and writes RUN_DIR/plots/*.png, one line per file written. The work is done by
`pipeline.eval.plots`; this file only parses arguments and prints. Exit status: 0 done, 1 nothing
to plot, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.eval.plots import plot_run


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(
        prog="plot.py", description="Plot a run's metrics.jsonl and results.json to PNG files."
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run directory")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    written = plot_run(args.run_dir)
    if not written:
        print(
            f"error: nothing to plot in {args.run_dir} (no metrics.jsonl, *_metrics.jsonl or "
            "results.json with numbers)",
            file=sys.stderr,
        )
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

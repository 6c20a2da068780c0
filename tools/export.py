"""Export a pretrained backbone to one safetensors file plus a JSON config.

    python tools/export.py RUN_DIR|CKPT OUT.safetensors [--which teacher|student]

RUN_DIR: a run directory (its newest committed checkpoint is exported); CKPT: a checkpoint tag
directory (`RUN_DIR/checkpoints/step-XXXXXXXX`). `--which` defaults to the teacher for DINO runs
and the student (the encoder) for MAE runs. Writes OUT.safetensors and OUT.json; reload with
`pipeline.eval.export.load_exported(OUT.safetensors)`. The work is done by `pipeline.eval.export`;
this file only parses arguments and prints. Exit status: 0 done, 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import RecipeError
from pipeline.eval.export import WHICH, ExportError, export_backbone, read_exported_config


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(
        prog="export.py",
        description="Export a pretrained backbone (teacher or student) to safetensors + JSON.",
    )
    p.add_argument("source", metavar="RUN_DIR|CKPT", type=Path, help="run or tag directory")
    p.add_argument("out", metavar="OUT.safetensors", type=Path, help="output weights file")
    p.add_argument(
        "--which",
        choices=WHICH,
        help="network to export (default: teacher for DINO, student for MAE)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        out = export_backbone(args.source, args.out, which=args.which)
    except (ExportError, RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = read_exported_config(out)
    print(json.dumps({"weights": str(out), **config}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

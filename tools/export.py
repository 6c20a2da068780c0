"""Export pretrained weights to one safetensors file plus a JSON config, or verify a checkpoint.

    python tools/export.py RUN_DIR|CKPT OUT.safetensors [--which teacher|student]
    python tools/export.py RUN_DIR|CKPT OUT.safetensors --contents method
    python tools/export.py --verify RUN_DIR|CKPT

RUN_DIR: a run directory (its newest committed checkpoint); CKPT: a checkpoint tag directory
(`RUN_DIR/checkpoints/step-XXXXXXXX`). The checkpoint is verified first (every file against the
SHA-256 its commit record lists, and no file holding more than tensors and plain values).

`--contents backbone` (default) writes the backbone alone (`--which` defaults to the teacher for
DINO runs and the student, the encoder, for MAE runs); reload it with
`pipeline.eval.export.load_exported(OUT.safetensors)`. `--contents method` writes the whole method
(student with its heads or decoder, and DINO's teacher and centre), which a new run continues
from with `model.init_from=OUT.safetensors`. `--verify` only checks the checkpoint and prints
what it holds. The work is done by `pipeline.eval.export`; this file parses arguments and prints.
Exit status: 0 done (verified), 2 bad arguments or a checkpoint that fails a check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import RecipeError
from pipeline.eval.export import CONTENTS, WHICH, ExportError, export, read_exported_config
from pipeline.train.checkpoint import read_commit
from pipeline.train.weights import resolve_checkpoint


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(
        prog="export.py",
        description="Export pretrained weights to safetensors + JSON, or verify a checkpoint.",
    )
    p.add_argument("source", metavar="RUN_DIR|CKPT", type=Path, help="run or tag directory")
    p.add_argument("out", metavar="OUT.safetensors", type=Path, nargs="?", help="output file")
    p.add_argument(
        "--which",
        choices=WHICH,
        help="backbone to export (default: teacher for DINO, student for MAE)",
    )
    p.add_argument(
        "--contents", choices=CONTENTS, default="backbone", help="backbone alone or whole method"
    )
    p.add_argument("--verify", action="store_true", help="check the checkpoint, export nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify == (args.out is not None):
        parser.error("give either OUT.safetensors or --verify")
    try:
        if args.verify:
            tag = resolve_checkpoint(args.source)
            record = read_commit(tag)
            keys = ("step", "world_size", "zero_stage", "created")
            print(json.dumps({"verified": str(tag), "files": len(record["files"]),
                              **{k: record.get(k) for k in keys}}, indent=1))  # fmt: skip
            return 0
        out = export(args.source, args.out, args.contents, args.which)
    except (ExportError, RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = read_exported_config(out)
    print(json.dumps({"weights": str(out), **config}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

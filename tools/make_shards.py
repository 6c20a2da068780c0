"""Write an image folder or a path list into WebDataset tar shards, or verify a shard folder.

    python tools/make_shards.py SRC OUT [--shard-size N] [--shard-bytes B] [--max-side PX]
                                        [--workers N] [--seed S] [--force] [--no-progress]
    python tools/make_shards.py --verify OUT

SRC is a folder with one subfolder per class, a folder of images (unlabelled), a .txt list of
paths or a .csv of `path,label`. The work is done by `pipeline.data.shards`; this file only parses
arguments and prints. Exit status: 0 done (or up to date / verified), 1 verification found
problems, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data.shards import ShardsError, load_manifest, verify_shards, write_shards

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_bytes(text: str) -> int:
    """'500000' -> 500000; '64M' -> 64 MiB; suffixes K, M, G (binary), optional 'B'/'iB'."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        result = int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None
    if result < 1:
        raise argparse.ArgumentTypeError(f"byte size must be positive: {text!r}")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Write images into WebDataset tar shards with a manifest, or verify shards.",
    )
    p.add_argument("src", nargs="?", metavar="SRC", help="image folder, .txt or .csv")
    p.add_argument("out", nargs="?", metavar="OUT", help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--shard-bytes", type=parse_bytes, help="bytes per shard at most, e.g. 256M")
    p.add_argument("--max-side", type=int, help="downscale images whose longer side exceeds PX")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    p.add_argument("--force", action="store_true", help="replace shards of another run in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--verify", metavar="OUT", help="check the shards in OUT against the manifest")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.src is not None:
            parser.error("--verify OUT takes no SRC/OUT arguments")
        problems = verify_shards(args.verify)
        for problem in problems:
            print(problem)
        if problems:
            print(f"FAILED: {len(problems)} problems in {args.verify}")
            return 1
        manifest = load_manifest(args.verify)
        print(f"OK: {len(manifest.shards)} shards, {manifest.total_samples} samples")
        return 0
    if args.src is None or args.out is None:
        parser.error("SRC and OUT are required (or --verify OUT)")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        summary = write_shards(
            args.src,
            args.out,
            shard_size=args.shard_size,
            shard_bytes=args.shard_bytes,
            max_side=args.max_side,
            workers=args.workers,
            seed=args.seed,
            progress=not args.no_progress,
            force=args.force,
        )
    except (FileNotFoundError, ShardsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

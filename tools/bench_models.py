"""Forward+backward throughput and peak memory per backbone.

    python tools/bench_models.py                              # CPU-sized default set
    python tools/bench_models.py --models swin_tiny,vit_base_patch16 --batch 64 \
        --resolution 256x192 --dtype bf16 --json bench_models.json

Each backbone runs in a fresh process so its peak memory is its own: on CUDA the allocator's peak,
on CPU the growth of the process's peak resident set over the baseline after imports.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch

from pipeline.models import BACKBONES, build_backbone

CPU_DEFAULT = ["vit_small_patch16", "vit_base_patch16", "swin_tiny", "twins_svt_small"]
GPU_DEFAULT = [
    "vit_small_patch16",
    "vit_base_patch16",
    "vit_large_patch16",
    "swin_tiny",
    "swin_small",
    "swin_base",
    "twins_svt_small",
    "twins_svt_base",
    "twins_svt_large",
]


def parse_resolution(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '256x192' -> (256, 192) as (height, width)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be N or HxW, got {text!r}")
    return parts[0], parts[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_one(name: str, args: argparse.Namespace) -> dict:
    """Time `args.steps` forward+backward passes of one backbone after `args.warmup` passes."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    baseline_rss = _peak_rss_mb()
    model = build_backbone(
        name, num_classes=args.num_classes, grad_checkpointing=args.grad_checkpointing
    )
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    h, w = args.resolution
    x = torch.randn(args.batch, 3, h, w, device=device)
    target = torch.randint(0, max(args.num_classes, 1), (args.batch,), device=device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=args.dtype == "bf16"):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = _peak_rss_mb() - baseline_rss
    return {
        "model": name,
        "params_m": round(params / 1e6, 2),
        "batch": args.batch,
        "resolution": f"{h}x{w}",
        "dtype": args.dtype,
        "grad_checkpointing": args.grad_checkpointing,
        "images_per_s": round(args.batch * args.steps / elapsed, 2),
        "ms_per_step": round(1000 * elapsed / args.steps, 1),
        "peak_mem_mb": round(peak_mb, 1),
    }


def _child(name: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    try:
        queue.put(bench_one(name, args))
    except Exception as exc:  # reported, and the next model still runs
        queue.put({"model": name, "error": f"{type(exc).__name__}: {exc}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", help="comma-separated backbone names (default: a set per device)"
    )
    parser.add_argument("--batch", type=int, default=None, help="images per step (CPU 8, GPU 64)")
    parser.add_argument("--resolution", type=parse_resolution, default=(224, 224), help="N or HxW")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", default="bench_models.json", help="where to write the figures")
    args = parser.parse_args(argv)

    gpu = args.device.startswith("cuda")
    names = args.models.split(",") if args.models else (GPU_DEFAULT if gpu else CPU_DEFAULT)
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        parser.error(f"unknown backbone(s) {', '.join(unknown)}; known: {', '.join(BACKBONES)}")
    args.batch = args.batch or (64 if gpu else 8)

    ctx = mp.get_context("spawn")
    header = f"{'model':<20}{'params(M)':>10}{'images/s':>10}{'ms/step':>10}{'peak MB':>10}"
    where = f"{args.device}, {torch.get_num_threads()} threads" if not gpu else args.device
    print(f"batch {args.batch} at {args.resolution[0]}x{args.resolution[1]}, {args.dtype}, {where}")
    print(header)
    results = []
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, queue))
        proc.start()
        proc.join()
        row = queue.get() if not queue.empty() else {"model": name, "error": "process died"}
        results.append(row)
        if "error" in row:
            print(f"{name:<20} failed: {row['error']}")
        else:
            print(
                f"{name:<20}{row['params_m']:>10.2f}{row['images_per_s']:>10.2f}"
                f"{row['ms_per_step']:>10.1f}{row['peak_mem_mb']:>10.1f}"
            )
    report = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "results": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

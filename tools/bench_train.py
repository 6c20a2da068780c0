"""Benchmark pretraining steps: images/s, MFU and memory per rank for method x backbone x ZeRO
stage, eager and compiled.

    python tools/bench_train.py --methods mae,dino --backbones vit_small_patch16 --stages 0,2,3 \\
        --size 224 --batch 8 --world-size 2 --json bench_train.json
    python tools/bench_train.py --methods dino --backbones vit_base_patch16 --stages 2 \\
        --precision bf16 --batch 128 --world-size 1 --compile both

Model FLOPs per image are counted from the architecture (`pipeline.train.flops`: matrix
products, backward = 2x forward, DINO's teacher forward on the global crops), and MFU is
images/s x FLOPs per image / (ranks x peak), the peak from `--peak-tflops` or, on a known GPU,
its dense bf16 datasheet figure (989 TFLOP/s for H100/H200). `--compile both` runs every
combination eager and with `train.compile` (compiled transformer blocks) side by side; ZeRO-3
refuses compilation, so its compiled row is skipped.

Each combination runs in fresh processes (one per rank, gloo on CPU, NCCL on GPU): the real
engine pieces (`build_objective`, `deepspeed_config`, `StepContext`, `train_step`) on synthetic
uint8 batches, so the figure is the step itself, not the loader (see `tools/bench_loader.py`). The
method settings come from the paper recipes (DINO: `recipes/dino_vits16.yaml`, MAE:
`recipes/mae_vitb16.yaml`), with the backbone, crop size, batch, precision and stage replaced.

Per rank it reports the bytes held for parameters and optimizer state (every distinct
tensor storage the engine keeps, counted once), the DINO teacher, and the peak memory (CUDA
allocator peak on GPU, resident set on CPU). `state_vs_zero0` compares parameters + optimizer
state with stage 0 of the same method and backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_recipe  # noqa: E402
from pipeline.train.distributed import free_port, rank_environ  # noqa: E402
from pipeline.train.flops import method_step_flops, peak_tflops  # noqa: E402

RECIPES = {"dino": ROOT / "recipes/dino_vits16.yaml", "mae": ROOT / "recipes/mae_vitb16.yaml"}


def storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` not counted yet (views count once)."""
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def innermost_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def state_memory(engine, teacher) -> dict[str, float]:
    """MiB held by this rank for parameters, optimizer state and the teacher.

    Gradients are left out: DeepSpeed frees or reuses their buffers between steps, so a count
    after the step says nothing; their peak is part of `peak_mem_gb`.
    """
    seen: set[int] = set()
    params = [getattr(p, "ds_tensor", p.data) for p in engine.module.parameters()]
    opt = innermost_optimizer(engine)
    masters = [p for g in opt.param_groups for p in g["params"]]
    out = {"params_mb": storage_bytes(params, seen)}
    # fp32 masters (ZeRO-1/2/3 flat partitions; under fp32 ZeRO-0 they are the params above).
    out["optim_mb"] = storage_bytes(masters, seen) + storage_bytes(
        [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)], seen
    )
    if teacher is not None:
        tensors = [getattr(p, "ds_tensor", p.data) for p in teacher.module.parameters()]
        out["teacher_mb"] = storage_bytes(tensors + getattr(teacher, "master", []), seen)
    return {k: round(v / 2**20, 2) for k, v in out.items()}


def synthetic_batch(recipe, method: str, batch: int, gen: torch.Generator) -> dict:
    crops = recipe.data.crops
    if method == "dino":
        sizes = [crops.global_size] * 2 + [crops.local_size] * crops.local_number
    else:
        sizes = [crops.mae_size]
    shape = [(batch, 3, s, s) for s in sizes]
    views = [torch.randint(0, 256, sh, dtype=torch.uint8, generator=gen) for sh in shape]
    return {"views": views, "id": torch.arange(batch)}


def _rank(rank: int, world_size: int, port: int, job: dict, out: str) -> None:
    os.environ.update(rank_environ(rank, world_size, port))
    import deepspeed

    from pipeline.models import compile_blocks
    from pipeline.train.distributed import DistEnv, finish_and_exit, init_distributed
    from pipeline.train.engine import DTYPES, StepContext, deepspeed_config, train_step
    from pipeline.train.metrics import peak_memory_gb
    from pipeline.train.objectives import build_objective

    env = DistEnv(rank, rank, world_size)
    init_distributed(env)
    recipe = load_recipe(RECIPES[job["method"]], job["overrides"])
    torch.manual_seed(0)
    objective = build_objective(recipe)
    ds_config = deepspeed_config(recipe)
    groups = objective.param_groups(recipe.optim.weight_decay)
    if recipe.train.compile:
        for module in objective.modules():
            compile_blocks(module)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=objective.student, model_parameters=groups, config=ds_config
    )
    for g in optimizer.param_groups:
        g["lr"] = 1e-4
    ctx = StepContext(
        objective=objective,
        device=env.device,
        dtype=DTYPES[recipe.train.precision],
        generator=torch.Generator(env.device).manual_seed(rank),
        world_size=world_size,
    )
    objective.attach(engine, ds_config, env.device)
    gen = torch.Generator().manual_seed(rank)
    batch = synthetic_batch(recipe, job["method"], job["batch"], gen)
    values = {"step": 0, "lr": 1e-4, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.04}
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    for _ in range(job["warmup"]):
        train_step(engine, batch, values, ctx)
    sync()
    start = time.perf_counter()
    for _ in range(job["steps"]):
        train_step(engine, batch, values, ctx)
    sync()
    seconds = (time.perf_counter() - start) / job["steps"]
    result = {
        "rank": rank,
        "step_ms": round(1000 * seconds, 1),
        "images_per_s": round(job["batch"] * world_size / seconds, 2),
        "peak_mem_gb": round(peak_memory_gb(env.device), 3),
        **state_memory(engine, getattr(objective, "teacher", None)),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finish_and_exit()


def run_job(job: dict, world_size: int, tmp: Path) -> list[dict]:
    """One combination in `world_size` fresh processes; the per-rank results."""
    for f in tmp.glob("rank*.json"):
        f.unlink()
    mp.spawn(_rank, args=(world_size, free_port(), job, str(tmp)), nprocs=world_size, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world_size)]


def bench_one(
    args: argparse.Namespace,
    method: str,
    backbone: str,
    stage: int,
    compiled: bool,
    peak: float | None,
    tmp: Path,
) -> dict:
    """One combination: its per-rank figures, images/s, model FLOPs per image and MFU."""
    overrides = [
        f"model.backbone={backbone}",
        f"deepspeed.zero_stage={stage}",
        f"train.precision={args.precision}",
        f"train.batch_size={args.batch}",
        f"data.crops.global_size={args.size}",
        f"data.crops.mae_size={args.size}",
        f"data.crops.local_size={args.local_size}",
        f"data.crops.local_number={args.local_crops}",
        f"train.compile={str(compiled).lower()}",
        *args.set,
    ]
    job = {"method": method, "overrides": overrides, "batch": args.batch,
           "steps": args.steps, "warmup": args.warmup}  # fmt: skip
    flops = method_step_flops(load_recipe(RECIPES[method], overrides))
    ranks = run_job(job, args.world_size, tmp)
    images = ranks[0]["images_per_s"]
    per_device = images * flops / args.world_size
    return {
        "method": method, "backbone": backbone, "zero_stage": stage, "compiled": compiled,
        "world_size": args.world_size, "size": args.size, "batch": args.batch,
        "precision": args.precision, "images_per_s": images,
        "gflop_per_image": round(flops / 1e9, 2),
        "tflops_per_device": round(per_device / 1e12, 3), "peak_tflops": peak,
        "mfu": round(per_device / (peak * 1e12), 4) if peak else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "ranks": ranks,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="mae,dino")
    p.add_argument("--backbones", default="vit_small_patch16")
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--size", type=int, default=224, help="global / MAE crop side")
    p.add_argument("--local-size", type=int, default=96, help="DINO local crop side")
    p.add_argument("--local-crops", type=int, default=10, help="DINO local crops per image")
    p.add_argument("--batch", type=int, default=8, help="images per rank")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = default)")
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="both" if torch.cuda.is_available() else "off",
        help="eager, compiled blocks, or both side by side (default: both on GPU, off on CPU)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="per-device peak for MFU (default: the GPU's dense bf16 datasheet figure)",
    )
    p.add_argument("--set", nargs="*", default=[], help="extra recipe overrides (key=value)")
    p.add_argument("--json", type=Path, default=Path("bench_train.json"))
    args = p.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    peak = args.peak_tflops
    if peak is None and torch.cuda.is_available():
        peak = peak_tflops(torch.cuda.get_device_name())
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    tmp = args.json.with_suffix(".ranks")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    columns = ["img/s", "GFLOP/im", "MFU %", "ms/step", "params", "optim", "teacher", "peak GB"]
    print(f"{'method':<6}{'backbone':<22}{'ZeRO':>5}{'mode':>9}"
          + "".join(f"{c:>9}" for c in columns) + f"{'vs Z0':>7}")  # fmt: skip
    zero0: dict[tuple[str, str], float] = {}  # eager ZeRO-0 state per method x backbone
    for method, backbone, stage, compiled in (
        (m, b, int(s), c)
        for m in args.methods.split(",")
        for b in args.backbones.split(",")
        for s in args.stages.split(",")
        for c in modes
    ):
        if compiled and stage == 3:
            print(f"{method:<6}{backbone:<22}{stage:>5}{'compiled':>9}  refused under ZeRO-3")
            continue
        row = bench_one(args, method, backbone, stage, compiled, peak, tmp)
        worst = max(row["ranks"], key=lambda r: r["params_mb"] + r["optim_mb"])
        state = worst["params_mb"] + worst["optim_mb"]
        if stage == 0 and not compiled:
            zero0[method, backbone] = state
        base = zero0.get((method, backbone))
        row["state_vs_zero0"] = round(state / base, 3) if base else None
        rows.append(row)
        ratio = f"{row['state_vs_zero0']:.2f}" if base else "-"
        mfu = f"{100 * row['mfu']:>9.2f}" if row["mfu"] is not None else f"{'-':>9}"
        figures = [
            worst["step_ms"],
            worst["params_mb"],
            worst["optim_mb"],
            worst.get("teacher_mb", 0.0),
            max(r["peak_mem_gb"] for r in row["ranks"]),
        ]
        cells = "".join(f"{v:>9.2f}" for v in figures)
        mode = "compiled" if compiled else "eager"
        print(f"{method:<6}{backbone:<22}{stage:>5}{mode:>9}{row['images_per_s']:>9.2f}"
              f"{row['gflop_per_image']:>9.1f}{mfu}{cells}{ratio:>7}", flush=True)  # fmt: skip
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

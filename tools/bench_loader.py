"""Loader throughput per CPU core: JPEG decode alone vs the CPU side of a view transform, and the
batched device-side augmentation per image.

    python tools/bench_loader.py --make-photos /tmp/photos --count 300   # test shards from sklearn
    python tools/bench_loader.py /tmp/photos --mode dino --workers 2 --json bench_loader.json

SHARDS is a folder of WebDataset .tar shards (every *.tar in it; a manifest is not needed). The
images are read into memory first, so the figures are CPU work only, no I/O. N decode-only
processes and N transform processes (one torch/OpenMP thread each, each over its own share of
the images) take turns every --chunk images, so N processes run at any time: a decode-only
process never runs a transform (its allocator and caches are those of a decode-only loader),
and drifts of the machine's speed hit both alike. images/s per core = images / summed wall
time of the turns / N; the ratio is also given as the median over chunks.

Decode only = `pipeline.data.transforms.decode` (Pillow, full size, RGB). The transform (mae:
`MaeCrop`, dino: `DinoCrops`, default `CropsConfig`) includes its own decode. The device-side
figure is `DeviceAugment` (dino, default `ColorConfig`) or `normalize` (mae) on batches of 64
samples' views already on the device (CUDA if present, else the CPU with one thread).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


# ------------------------------------------------------------------------------------------------
# Test photos
# ------------------------------------------------------------------------------------------------


def make_photos(out_dir: Path, count: int, *, shard_size: int = 1000, seed: int = 0) -> int:
    """Write `count` distinct 500x375 JPEG photos (quality 90) cut from scikit-learn's two sample
    photos (random scale, crop and flip) as WebDataset shards: key.jpg + key.json with width,
    height and path. Returns the number of shards written."""
    import numpy as np
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    photos = [Image.fromarray(img) for img in samples.images]
    names = [Path(f).stem for f in samples.filenames]
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    width, height = 500, 375
    shards = 0
    writer = None
    for i in range(count):
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(out_dir / f"shard-{shards:06d}.tar"))
            shards += 1
        k = int(rng.integers(len(photos)))
        src = photos[k]
        # Scale so that a 500 x 375 window fits, up to 2x: the content of every photo differs.
        low = max(width / src.width, height / src.height)
        scale = rng.uniform(low, 2.0)
        size = (max(width, round(src.width * scale)), max(height, round(src.height * scale)))
        big = src.resize(size, Image.Resampling.BICUBIC)
        x = int(rng.integers(big.width - width + 1))
        y = int(rng.integers(big.height - height + 1))
        photo = big.crop((x, y, x + width, y + height))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=90)
        meta = {"width": width, "height": height, "path": f"sklearn/{names[k]}/{i:06d}.jpg"}
        writer.write({"__key__": f"photo-{i:06d}", "jpg": buf.getvalue(), "json": meta})
    if writer is not None:
        writer.close()
    return shards


def read_images(shard_dir: Path, limit: int | None) -> list[bytes]:
    """Encoded images of every *.tar in shard_dir (sorted), through webdataset's tar reader."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    shards = sorted(shard_dir.glob("*.tar"))
    if not shards:
        raise SystemExit(f"no .tar shards in {shard_dir}")
    images: list[bytes] = []
    for shard in shards:
        with open(shard, "rb") as stream:
            files = tar_file_expander([{"url": str(shard), "stream": stream}])
            for sample in group_by_keys(files):
                data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                if data is not None:
                    images.append(data)
                if limit is not None and len(images) >= limit:
                    return images
    return images


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------


def _worker(
    role: str, mode: str, worker: int, images: list[bytes], plan: tuple[int, int], barrier, results
) -> None:
    """One process, one job: `role` "decode" times decode only, "transform" times the mode's
    transform. Both kinds take turns chunk by chunk (barriers), so a decode-only process never
    runs a transform (its allocator and caches stay those of a decode-only loader) while both
    see the same drifts of the machine's speed."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from pipeline.config import CropsConfig
    from pipeline.data import transforms

    rounds, chunk = plan
    rng = np.random.default_rng(worker)
    if role == "decode":

        def run(data: bytes) -> None:
            transforms.decode(data)
    else:
        make = (transforms.DinoCrops if mode == "dino" else transforms.MaeCrop)(CropsConfig())

        def run(data: bytes) -> None:
            make(data, rng)

    for data in images:  # warm-up pass: first touches of the data, allocator, caches
        run(data)
    times = []
    for _ in range(rounds):
        for i in range(0, len(images), chunk):
            for turn in ("decode", "transform"):
                barrier.wait()
                if turn == role:
                    start = time.perf_counter()
                    for data in images[i : i + chunk]:
                        run(data)
                    times.append(time.perf_counter() - start)
    results.put((role, worker, times))


def bench_cpu(
    images: list[bytes], mode: str, workers: int, rounds: int, chunk: int
) -> dict[str, float]:
    """Per-core images/s of decode and (unless mode is decode) the transform: `workers` decode
    processes and `workers` transform processes, each over its own share of the images, taking
    turns so that `workers` processes run at any time."""
    import numpy as np

    # Children inherit these before they import torch/numpy: one thread each.
    os.environ.update(ONE_THREAD)
    ctx = mp.get_context("spawn")  # no fork after torch's thread pools exist
    roles = ["decode"] + ([] if mode == "decode" else ["transform"])
    barrier = ctx.Barrier(workers * len(roles))
    results = ctx.Queue()
    per_worker = len(images) // workers  # equal shares: every process sees as many barriers
    shares = [images[w * per_worker : (w + 1) * per_worker] for w in range(workers)]
    plan = (rounds, chunk)
    procs = [
        ctx.Process(target=_worker, args=(role, mode, w, share, plan, barrier, results))
        for role in roles
        for w, share in enumerate(shares)
    ]
    for p in procs:
        p.start()
    times: dict[str, list[list[float]]] = {role: [] for role in roles}
    for _ in procs:
        role, _, t = results.get()
        times[role].append(t)
    for p in procs:
        p.join()
    # Wall time of a turn = its slowest process (turns are separated by barriers).
    per_chunk = {role: np.max(times[role], axis=0) for role in roles}
    n = per_worker * workers * rounds
    out = {"images_timed": n, "decode_per_core": n / per_chunk["decode"].sum() / workers}
    if mode != "decode":
        out["transform_per_core"] = n / per_chunk["transform"].sum() / workers
        out["ratio"] = out["transform_per_core"] / out["decode_per_core"]
        # The machine's speed can drift within seconds; the median of per-chunk ratios (each
        # from back-to-back turns) is the figure least affected by that.
        out["ratio_median_chunk"] = float(np.median(per_chunk["decode"] / per_chunk["transform"]))
    return out


# ------------------------------------------------------------------------------------------------
# Device side
# ------------------------------------------------------------------------------------------------


def bench_device(images: list[bytes], mode: str, batch: int, iters: int) -> dict[str, object]:
    """Images/s of the device-side augmentation on batches of `batch` samples' views."""
    import numpy as np
    import torch

    from pipeline.config import ColorConfig, CropsConfig
    from pipeline.data import transforms

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    crops = CropsConfig()
    make = transforms.DinoCrops(crops) if mode == "dino" else transforms.MaeCrop(crops)
    rng = np.random.default_rng(0)
    samples = [make(images[i % len(images)], rng) for i in range(batch)]
    views = [v.to(device) for v in transforms.collate_views(samples)]
    color = ColorConfig()
    if mode == "dino":
        augment = transforms.DeviceAugment(color, num_global=2)
        gen = torch.Generator(device=device).manual_seed(0)

        def step() -> list[torch.Tensor]:
            return augment(views, gen)
    else:

        def step() -> list[torch.Tensor]:
            return transforms.normalize(views, color.mean, color.std)

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} thread)"
    return {
        "device": name,
        "batch": batch,
        "views": [list(v.shape[1:]) for v in views],
        "device_aug_per_s": batch / seconds,
        "device_aug_us_per_image": seconds / batch * 1e6,
    }


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="?", type=Path, help="folder of WebDataset .tar shards")
    parser.add_argument("--mode", choices=["decode", "mae", "dino"], default="dino")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (one core each)")
    parser.add_argument("--limit", type=int, default=None, help="read at most K images")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--chunk", type=int, default=25, help="images per alternating phase")
    parser.add_argument("--batch", type=int, default=64, help="device-side batch (samples)")
    parser.add_argument("--device-iters", type=int, default=3, help="timed device-side batches")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--make-photos", type=Path, default=None, metavar="DIR", help="write test photo shards"
    )
    parser.add_argument("--count", type=int, default=300, help="photos for --make-photos")
    args = parser.parse_args(argv)

    if args.make_photos is not None:
        shards = make_photos(args.make_photos, args.count)
        print(f"wrote {args.count} 500x375 JPEG photos, {shards} shard(s), to {args.make_photos}")
        if args.shards is None:
            return 0
    if args.shards is None:
        parser.error("SHARDS is required unless --make-photos is given")
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    images = read_images(args.shards, args.limit)
    if len(images) < args.workers:
        parser.error(f"{len(images)} images for {args.workers} workers")
    from PIL import Image

    sizes = [Image.open(io.BytesIO(d)).size for d in images]
    mean_w = sum(s[0] for s in sizes) / len(sizes)
    mean_h = sum(s[1] for s in sizes) / len(sizes)

    result: dict[str, object] = {
        "mode": args.mode,
        "workers": args.workers,
        "images": len(images),
        "rounds": args.rounds,
        "mean_size_wh": [round(mean_w, 1), round(mean_h, 1)],
        "mean_bytes": round(sum(map(len, images)) / len(images)),
    }
    result.update(bench_cpu(images, args.mode, args.workers, args.rounds, args.chunk))
    if args.mode != "decode":
        result.update(bench_device(images, args.mode, args.batch, args.device_iters))

    import PIL
    import torch

    result["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def print_table(r: dict) -> None:
    w, h = r["mean_size_wh"]
    print(
        f"\nmode {r['mode']}, {r['workers']} worker(s), {r['images']} images "
        f"(mean {w:.0f}x{h:.0f}, {r['mean_bytes'] / 1024:.0f} KiB), {r['rounds']} round(s)"
    )
    print(f"{'':34s}{'images/s per core':>18s}{'us / image':>12s}")
    rows = [("decode only", r["decode_per_core"])]
    if "transform_per_core" in r:
        rows.append((f"CPU views ({r['mode']}, incl. decode)", r["transform_per_core"]))
    for name, rate in rows:
        print(f"{name:34s}{rate:18.1f}{1e6 / rate:12.0f}")
    if "ratio" in r:
        print(f"{'ratio views / decode':34s}{r['ratio']:18.3f}")
        print(f"{'  (median of per-chunk ratios)':34s}{r['ratio_median_chunk']:18.3f}")
    if "device_aug_per_s" in r:
        name = f"device aug ({r['device']}, batch {r['batch']})"
        print(f"{name:34s}{r['device_aug_per_s']:18.1f}{r['device_aug_us_per_image']:12.0f}")


if __name__ == "__main__":
    sys.exit(main())

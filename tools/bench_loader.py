"""Loader throughput per CPU core: JPEG decode alone vs the CPU side of a view transform, and the
batched device-side augmentation per image.

    python tools/bench_loader.py --make-photos /tmp/photos --count 300   # test shards from sklearn
    python tools/bench_loader.py /tmp/photos --mode dino --workers 2 --json bench_loader.json
    python tools/bench_loader.py /tmp/photos --mode dino --workers 2 --repeat 3 --phases
    python tools/bench_loader.py /tmp/photos --mode dino --on-device --workers 2 --batch 256

SHARDS is a folder of WebDataset .tar shards (every *.tar in it; a manifest is not needed). The
images are read into memory first, so the figures are CPU work only, no I/O. N decode-only
processes and N transform processes (one torch/OpenMP thread each, each over its own share of
the images) take turns every --chunk images, so N processes run at any time: a decode-only
process never runs a transform (its allocator and caches are those of a decode-only loader),
and drifts of the machine's speed hit both alike. Decode worker i and transform worker i are
pinned to the same core (where the OS allows it), as the cores of a shared machine can differ.
images/s per core = images / summed wall time of the turns / N; the ratio is also given as the
median over chunks. The "per CPU-s" column counts CPU time instead (images / summed CPU seconds
of the processes): on a machine shared with other jobs it leaves out the time a process waited
for a core. "faults" = minor page faults per image in the timed turns (allocator churn, see
--steady-malloc). --repeat measures again with fresh processes, and each process's CPU us per
image is printed: a process runs at one of two speeds (seen here: decode-only at ~650 or ~830 us
per 500x375 image), and keeps it until its heap layout changes. Pillow's JPEG decoder has
libjpeg-turbo write each row into a row buffer that Pillow callocs, then copies the row into the
image. Where that buffer is 32-byte aligned, libjpeg-turbo's AVX2 colour conversion writes it
with non-temporal stores, past the cache, and the copy reads every row back from memory: ~13% of
the decode time instead of ~1% (perf; buffer addresses checked in gdb). So single runs of either
role are not to be compared alone. --phases adds the mean CPU time of each step of the
transform, in this process.

Decode only = `pipeline.data.transforms.decode` (Pillow, full size, RGB). The transform (mae:
`MaeCrop`, dino: `DinoCrops`, default `CropsConfig`) includes its own decode. The device-side
figure is `DeviceAugment` (dino, default `ColorConfig`) or `normalize` (mae) on batches of 64
samples' views already on the device (CUDA if present, else the CPU with one thread).

--on-device measures crops cut on the device (`data.crops.on_device`): the CPU side is then the
transform built with on_device=True (header, the seeded boxes and flips, the decode with draft
where every box allows it: no crop, no resize), still against decode only in the same run; the
device side is `collate_decoded`'s batch moved to the device, cut there (`cut_views`) and
colour-augmented, per image, with the bytes moved to the device per image next to those of the
views the CPU path would move.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# glibc's defaults move the mmap threshold with the sizes it sees and give memory back to the
# OS when the top of the heap is free: a loop that frees and reallocates ~1 MB per image can
# then fault in every page of it again (measured here, ~3 us a fault: +0.4 ms per decode and
# +1.3 ms per DINO multicrop when every image does). Fixed thresholds keep the pages.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


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
    role: str,
    mode: str,
    worker: int,
    images: list[bytes],
    plan: tuple[int, int],
    barrier,
    results,
    on_device: bool = False,
) -> None:
    """One process, one job: `role` "decode" times decode only, "transform" times the mode's
    transform. Both kinds take turns chunk by chunk (barriers), so a decode-only process never
    runs a transform (its allocator and caches stay those of a decode-only loader) while both
    see the same drifts of the machine's speed."""
    import resource

    import numpy as np
    import torch

    if hasattr(os, "sched_setaffinity"):
        # Decode worker w and transform worker w share one core: each figure is then measured on
        # the same core as the one it is compared with (cores of a shared machine differ).
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[worker % len(cpus)]})
    torch.set_num_threads(1)
    from pipeline.config import CropsConfig
    from pipeline.data import transforms

    rounds, chunk = plan
    rng = np.random.default_rng(worker)
    if role == "decode":

        def run(data: bytes) -> None:
            transforms.decode(data)
    else:
        maker = transforms.DinoCrops if mode == "dino" else transforms.MaeCrop
        make = maker(CropsConfig(), on_device=on_device)

        def run(data: bytes) -> None:
            make(data, rng)

    for data in images:  # warm-up pass: first touches of the data, allocator, caches
        run(data)
    times = []  # (wall, CPU) seconds per turn
    faults = 0  # minor page faults in the timed turns: the allocator handing back fresh pages
    for _ in range(rounds):
        for i in range(0, len(images), chunk):
            for turn in ("decode", "transform"):
                barrier.wait()
                if turn == role:
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start, cpu = time.perf_counter(), time.process_time()
                    for data in images[i : i + chunk]:
                        run(data)
                    times.append((time.perf_counter() - start, time.process_time() - cpu))
                    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    results.put((role, times, faults))


def _next_result(results, procs: list) -> tuple:
    """The next worker's result; a worker that died (an import error, a crash in the transform)
    stops the benchmark with its exit code instead of leaving the others waiting at a barrier."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.terminate()
                raise SystemExit(
                    f"bench_loader: worker {dead[0].name} exited with code {dead[0].exitcode}"
                    " (its traceback is above)"
                ) from None


def _run_pairs(
    images: list[bytes], mode: str, workers: int, plan: tuple[int, int], on_device: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One measurement with fresh processes: per role, the (workers, turns, wall/CPU) seconds
    and the minor page faults of its timed turns."""
    import numpy as np

    ctx = mp.get_context("spawn")  # no fork after torch's thread pools exist
    roles = ["decode"] + ([] if mode == "decode" else ["transform"])
    barrier = ctx.Barrier(workers * len(roles))
    results = ctx.Queue()
    per_worker = len(images) // workers  # equal shares: every process sees as many barriers
    shares = [images[w * per_worker : (w + 1) * per_worker] for w in range(workers)]
    procs = [
        ctx.Process(target=_worker, args=(role, mode, w, share, plan, barrier, results, on_device))
        for role in roles
        for w, share in enumerate(shares)
    ]
    for p in procs:
        p.start()
    times: dict[str, list] = {role: [] for role in roles}
    faults = dict.fromkeys(roles, 0)
    for _ in procs:
        role, t, f = _next_result(results, procs)
        times[role].append(t)
        faults[role] += f
    for p in procs:
        p.join()
    return {role: np.asarray(t) for role, t in times.items()}, faults


def bench_cpu(
    images: list[bytes],
    mode: str,
    workers: int,
    rounds: int,
    chunk: int,
    repeat: int = 1,
    on_device: bool = False,
) -> dict[str, object]:
    """Per-core images/s of decode and (unless mode is decode) the transform: `workers` decode
    processes and `workers` transform processes, each over its own share of the images, taking
    turns so that `workers` processes run at any time; `repeat` times with fresh processes (a
    process can land in a faster or slower state for its whole life), figures over all."""
    import numpy as np

    # Children inherit these before they import torch/numpy: one thread each.
    os.environ.update(ONE_THREAD)
    per_worker = len(images) // workers
    runs = [_run_pairs(images, mode, workers, (rounds, chunk), on_device) for _ in range(repeat)]
    roles = list(runs[0][0])
    # Turns of all repeats side by side: (workers, turns, wall/CPU).
    timed = {role: np.concatenate([t[role] for t, _ in runs], axis=1) for role in roles}
    # Wall time of a turn = its slowest process (turns are separated by barriers).
    per_chunk = {role: t[..., 0].max(axis=0) for role, t in timed.items()}
    # CPU time of a turn = the sum over its processes: core-seconds actually spent. On a machine
    # shared with other jobs, time spent waiting for a core counts in wall time but not here.
    cpu_chunk = {role: t[..., 1].sum(axis=0) for role, t in timed.items()}
    n = per_worker * workers * rounds * repeat
    out: dict[str, object] = {"images_timed": n, "repeat": repeat}
    for role, name in (("decode", "decode"), ("transform", "transform")):
        if role in roles:
            out[f"{name}_per_core"] = n / per_chunk[role].sum() / workers
            out[f"{name}_per_cpu_s"] = n / cpu_chunk[role].sum()
            out[f"{name}_page_faults_per_image"] = sum(f[role] for _, f in runs) / n
    if "transform" in roles:
        out["ratio"] = out["transform_per_core"] / out["decode_per_core"]
        out["ratio_cpu"] = out["transform_per_cpu_s"] / out["decode_per_cpu_s"]
        # The machine's speed can drift within seconds; the median of per-chunk ratios (each
        # from back-to-back turns) is the figure least affected by that.
        out["ratio_median_chunk"] = float(np.median(per_chunk["decode"] / per_chunk["transform"]))
        out["ratio_cpu_median_chunk"] = float(
            np.median(cpu_chunk["decode"] / cpu_chunk["transform"])
        )
        out["ratio_cpu_per_repeat"] = [
            float(t["decode"][..., 1].sum() / t["transform"][..., 1].sum()) for t, _ in runs
        ]
    # CPU us per image of each process (repeat-major): shows the speed each process ran at.
    out["cpu_us_per_process"] = {
        role: [
            round(float(w[:, 1].sum()) / (per_worker * rounds) * 1e6)
            for t, _ in runs
            for w in t[role]
        ]
        for role in roles
    }
    return out


def bench_phases(
    images: list[bytes], mode: str, rounds: int, on_device: bool = False
) -> dict[str, float]:
    """Mean CPU microseconds per image of each step of the mode's CPU transform (one process,
    one thread): header, crop boxes, decode + pixels (with draft when the boxes allow), crop +
    resize (flips included), next to decode only and the whole transform. With `on_device` the
    crop + resize step is replaced by the batch copy (`collate_decoded`, per image), and the
    transform is the on-device one."""
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.config import CropsConfig
    from pipeline.data import transforms as T

    torch.set_num_threads(1)
    c = CropsConfig()
    from pipeline.data.device_crops import Decoded, collate_decoded

    if mode == "dino":
        make = T.DinoCrops(c, on_device=on_device)
        out_hw = [(c.global_size,) * 2] * 2 + [(c.local_size,) * 2] * c.local_number
        scales = make._scales
    else:
        make = T.MaeCrop(c, on_device=on_device)
        out_hw, scales = [(c.mae_size,) * 2], [c.mae_scale]
    log_ratios = [T._ratio_range(c.ratio, hw) for hw in out_hw]
    rng = np.random.default_rng(0)
    cut = "batch copy" if on_device else "crop + resize"
    names = ("header", "boxes", "decode + pixels", cut, "decode only", "transform")
    spent = dict.fromkeys(names, 0.0)
    for counted in [False] + [True] * rounds:  # the first pass only warms up
        for data in images:
            t = [time.process_time()]
            img = Image.open(io.BytesIO(data))
            t.append(time.process_time())
            boxes, flips = T.sample_boxes(rng, img.size[::-1], scales, log_ratios, c.hflip)
            t.append(time.process_time())
            pixels, boxes = T._decode_for_boxes(img, boxes, out_hw)
            t.append(time.process_time())
            if on_device:
                collate_decoded([Decoded(pixels, boxes, flips, out_hw)])
            else:
                T._crop_resize(pixels, boxes, out_hw, flips)
            t.append(time.process_time())
            T.decode(data)
            t.append(time.process_time())
            make(data, rng)
            t.append(time.process_time())
            if counted:
                for name, start, end in zip(names, t[:-1], t[1:], strict=True):
                    spent[name] += end - start
    return {name: t / (rounds * len(images)) * 1e6 for name, t in spent.items()}


# ------------------------------------------------------------------------------------------------
# Device side
# ------------------------------------------------------------------------------------------------


def bench_device(
    images: list[bytes], mode: str, batch: int, iters: int, on_device: bool = False
) -> dict[str, object]:
    """Images/s of the device-side augmentation on batches of `batch` samples' views; with
    `on_device`, of cutting the views there and augmenting them, with the bytes moved per
    image."""
    import numpy as np
    import torch

    from pipeline.config import ColorConfig, CropsConfig
    from pipeline.data import transforms
    from pipeline.data.device_crops import collate_decoded, cut_views

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    crops = CropsConfig()
    maker = transforms.DinoCrops if mode == "dino" else transforms.MaeCrop
    rng = np.random.default_rng(0)
    samples = [maker(crops)(images[i % len(images)], rng) for i in range(batch)]
    views = [v.to(device) for v in transforms.collate_views(samples)]
    moved = {"cpu_views_bytes_per_image": sum(v.numel() for v in views) / batch}
    color = ColorConfig()
    if mode == "dino":
        colour = transforms.DeviceAugment(color, num_global=2)
        gen = torch.Generator(device=device).manual_seed(0)

        def augment(views: list[torch.Tensor]) -> list[torch.Tensor]:
            return colour(views, gen)
    else:

        def augment(views: list[torch.Tensor]) -> list[torch.Tensor]:
            return transforms.normalize(views, color.mean, color.std)

    def step() -> list[torch.Tensor]:
        return augment(views)

    if on_device:
        rng = np.random.default_rng(0)
        decoded = [maker(crops, on_device=True)(images[i % len(images)], rng) for i in range(batch)]
        crop_batch = collate_decoded(decoded)
        moved["bytes_per_image"] = crop_batch.nbytes / batch
        moved["pixel_bytes_per_image"] = crop_batch.pixel_bytes / batch
        crop_batch = crop_batch.to(device)

        def step() -> list[torch.Tensor]:
            return augment(cut_views(crop_batch))

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
        **moved,
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
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure R times, each with fresh processes"
    )
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="fixed glibc malloc thresholds in the worker processes (both roles): no per-image "
        "page faults from the allocator returning and refetching memory",
    )
    parser.add_argument(
        "--on-device",
        action="store_true",
        help="crops cut on the device: the CPU side only decodes and samples boxes",
    )
    parser.add_argument("--batch", type=int, default=64, help="device-side batch (samples)")
    parser.add_argument("--device-iters", type=int, default=3, help="timed device-side batches")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--phases", action="store_true", help="also time each step of the transform (one process)"
    )
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
    if args.workers < 1 or args.repeat < 1:
        parser.error("--workers and --repeat must be >= 1")

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
        "on_device": args.on_device and args.mode != "decode",
    }
    if args.steady_malloc:
        os.environ.update(STEADY_MALLOC)  # read by glibc when each worker process starts
    result["steady_malloc"] = args.steady_malloc
    on_device = result["on_device"]
    result.update(
        bench_cpu(images, args.mode, args.workers, args.rounds, args.chunk, args.repeat, on_device)
    )
    if args.phases and args.mode != "decode":
        result["phases_us"] = bench_phases(images, args.mode, args.rounds, on_device)
    if args.mode != "decode":
        result.update(bench_device(images, args.mode, args.batch, args.device_iters, on_device))

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
        f"(mean {w:.0f}x{h:.0f}, {r['mean_bytes'] / 1024:.0f} KiB), {r['rounds']} round(s), "
        f"{r['repeat']} repeat(s){', steady malloc' if r['steady_malloc'] else ''}"
    )
    print(f"{'':34s}{'images/s per core':>18s}{'us / image':>12s}{'per CPU-s':>11s}{'faults':>8s}")
    rows = [("decode only", "decode")]
    if "transform_per_core" in r:
        if r.get("on_device"):
            rows.append((f"CPU side ({r['mode']} on device: decode+boxes)", "transform"))
        else:
            rows.append((f"CPU views ({r['mode']}, incl. decode)", "transform"))
    for name, key in rows:
        rate = r[f"{key}_per_core"]
        print(
            f"{name:34s}{rate:18.1f}{1e6 / rate:12.0f}{r[f'{key}_per_cpu_s']:11.1f}"
            f"{r[f'{key}_page_faults_per_image']:8.1f}"
        )
    if "ratio" in r:
        label = "ratio CPU side / decode" if r.get("on_device") else "ratio views / decode"
        print(f"{label:34s}{r['ratio']:18.3f}{'':12s}{r['ratio_cpu']:11.3f}")
        median, median_cpu = r["ratio_median_chunk"], r["ratio_cpu_median_chunk"]
        print(f"{'  (median of per-chunk ratios)':34s}{median:18.3f}{'':12s}{median_cpu:11.3f}")
        if r["repeat"] > 1:
            each = " ".join(f"{x:.3f}" for x in r["ratio_cpu_per_repeat"])
            print(f"{'  (per repeat, CPU time)':34s}  {each}")
    for role, us in r["cpu_us_per_process"].items():
        print(f"{'  CPU us / image, each ' + role:34s}  {' '.join(map(str, us))}")
    if "device_aug_per_s" in r:
        what = "device crops + colour" if r.get("on_device") else "device aug"
        name = f"{what} ({r['device']}, batch {r['batch']})"
        print(f"{name:34s}{r['device_aug_per_s']:18.1f}{r['device_aug_us_per_image']:12.0f}")
        if "bytes_per_image" in r:
            print(
                f"{'  bytes to the device per image':34s}{r['bytes_per_image']:18.0f}"
                f"  (pixels {r['pixel_bytes_per_image']:.0f}, CPU-cut views "
                f"{r['cpu_views_bytes_per_image']:.0f})"
            )
    if "phases_us" in r:
        print(f"\nsteps of the {r['mode']} transform, one process (CPU us / image)")
        for name, us in r["phases_us"].items():
            print(f"  {name:32s}{us:18.0f}")


if __name__ == "__main__":
    sys.exit(main())

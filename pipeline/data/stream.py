"""Deterministic, resumable streaming of WebDataset shards into batches.

Exact-epoch mode (the default) lays one epoch out up front, from (seed, epoch) alone:

- the shards are permuted; the samples not yet seen this epoch are cut into `world_size`
  contiguous runs of equal length (`ceil(R / W)`; a rank short of one sample repeats one, marked
  with id -1), so every rank takes the same number of batches and nobody hangs at an epoch end;
- each rank's batches are split into contiguous blocks, one per loader worker, so a worker reads
  only its own stretch of shards; batches come out in a fixed interleaved order (`slot`);
- a worker shuffles its samples through webdataset's seeded buffer, and each sample's crops are
  drawn from a generator seeded by (seed, epoch, sample id), never from the stream's history.

The position (`state_dict`) is a few numbers per worker, whatever the size of the data set: the
layout is recomputed, and what a worker consumed is the first `read` samples of its reading order
except those still in its shuffle buffer or buckets (at most a buffer's worth of positions). A
resume at the same world size, workers and batch size replays the layout (consumed samples pass
the shuffle as placeholders, their shards are not read again) and drops what was consumed, so the
batches that follow are bitwise those of an uninterrupted run; at any other layout what every
worker left is shared out afresh over the new ranks. Either way no sample is repeated or skipped
within the epoch. The layout itself (shard order, intervals, splits) is in `layout.py`.

Resampled mode is an endless stream: each worker draws shards with replacement; a resume starts
fresh streams (seeded by the batches already consumed) rather than replaying.

Corrupt samples (undecodable bytes, missing image, truncated tar) are counted, logged with shard
and key, and skipped; when more than `max_bad_fraction` of an epoch's samples on a rank are bad in
that epoch, the loader stops with an error naming the worst shard.

Not here: decoding and crops (`transforms.py`), bucketing policy (`buckets.py`), shard writing
(`shards.py`), and anything collective: per-rank states are gathered by the checkpoint code.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.shardlists import expand_urls

from pipeline.data import layout
from pipeline.data.layout import RankPlan, RawIndex, ShardRef, WorkerPlan, plan_epoch
from pipeline.data.layout import seed_of as _seed
from pipeline.data.shards import load_manifest

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
STATE_VERSION = 2  # 1: bitmaps of the whole data set; 2: intervals and per-worker counts

# transform(image bytes, rng, **shape) -> one sample's views (uint8 arrays), or what the device
# cuts them from (device_crops.Decoded); collate(the samples of a batch) -> the batch's views.
Transform = Callable[..., Any]
Collate = Callable[[list[Any]], Any]
# grouper(raw samples) -> groups of (raw sample, transform keywords): aspect buckets, NaViT rows.
Grouper = Callable[[Iterator[dict]], Iterator[list[tuple[dict, dict[str, Any]]]]]


class DataError(RuntimeError):
    """The data cannot be read as configured (bad-sample rate too high, shards changed, ...)."""


# ---------------------------------------------------------------------------------------------
# Shards


def _count_samples(url: str) -> int:
    keys = set()
    with tarfile.open(url) as tar:
        for member in tar:
            if member.isreg():
                keys.add(wds.tariterators.base_plus_ext(member.name)[0])
    return len(keys)


def resolve_shards(spec: str) -> list[ShardRef]:
    """A shard folder with manifest.json, or a brace pattern (`.../shard-{000000..000099}.tar`).

    Counts come from the manifest (for a pattern, from a manifest beside the shards when there is
    one); otherwise each shard is scanned once.
    """
    path = Path(spec)
    if path.is_dir() or path.name == "manifest.json":
        manifest = load_manifest(path)
        urls = [manifest.path(s) for s in manifest.shards]
        counts = [s.samples for s in manifest.shards]
    else:
        urls = expand_urls(spec)
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
        folder = Path(urls[0]).parent
        known: dict[str, int] = {}
        if (folder / "manifest.json").is_file():
            known = {s.name: s.samples for s in load_manifest(folder).shards}
        counts = [known.get(Path(u).name) or _count_samples(u) for u in urls]
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    return [ShardRef(u, n, o) for u, n, o in zip(urls, counts, offsets, strict=True)]


# ---------------------------------------------------------------------------------------------
# Worker side


@dataclass
class _Bad:
    """A sample that could not be used, travelling through the stream like a sample."""

    gid: int
    shard: str
    key: str
    reason: str
    pos: int = -1  # in the worker's reading order


def _read_ranges(shard: ShardRef, ranges: Sequence[tuple[int, int]]) -> Iterator[dict | _Bad]:
    """Raw samples of one shard whose local index lies in `ranges` (sorted, disjoint), in one
    pass over the file."""
    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return False  # a broken tar stream cannot be resynchronised: end this shard

    stream = wds.tariterators.url_opener([{"url": shard.url}], handler=keep_going)
    files = wds.tariterators.tar_file_expander(stream, handler=keep_going)
    index, r = -1, 0
    for index, sample in enumerate(wds.tariterators.group_by_keys(files, handler=keep_going)):
        while r < len(ranges) and index >= ranges[r][1]:
            r += 1
        if r == len(ranges):
            return
        if index < ranges[r][0]:
            continue
        sample["__gid__"] = shard.offset + index
        yield sample
    # Whatever the stream did not deliver is lost to truncation or a read error.
    reason = f"shard unreadable after sample {index}: {errors[0] if errors else 'truncated'}"
    for first, end in ranges[r:]:
        for missing in range(max(first, index + 1), min(end, shard.samples)):
            yield _Bad(shard.offset + missing, shard.name, f"#{missing}", reason)


def _by_shard(
    segments: Iterable[tuple[int, int, int]],
) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Consecutive segments of one shard, grouped so the shard is read once."""
    current, ranges = -1, []
    for shard_index, first, end in segments:
        if shard_index != current and ranges:
            yield current, ranges
            ranges = []
        current = shard_index
        ranges.append((first, end))
    if ranges:
        yield current, ranges


def _image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"no image member (has {sorted(k for k in sample if not k.startswith('__'))})")


def _label(sample: dict) -> int:
    return int(sample["cls"]) if "cls" in sample else -1


class _Batch:
    """Samples collected into one batch; bad ones are recorded instead of added."""

    def __init__(self) -> None:
        self.views: list[list[np.ndarray]] = []
        self.labels: list[int] = []
        self.ids: list[int] = []
        self.bad: list[tuple[int, str, str, str]] = []

    def __len__(self) -> int:
        return len(self.views)

    def add(
        self,
        item: dict | _Bad,
        transform: Transform,
        rng: np.random.Generator,
        shape: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(item, _Bad):
            self.bad.append((item.gid, item.shard, item.key, item.reason))
            return
        try:
            self.views.append(transform(_image_bytes(item), rng, **(shape or {})))
        except Exception as exc:  # any decode failure is a bad sample, not a dead run
            shard = Path(item["__url__"]).name
            reason = f"{type(exc).__name__}: {exc}"
            self.bad.append((item["__gid__"], shard, item["__key__"], reason))
            return
        self.labels.append(_label(item))
        self.ids.append(item["__gid__"])

    def finish(self, collate: Collate, **extra: Any) -> dict:
        return {
            "views": collate(self.views),
            "label": torch.tensor(self.labels, dtype=torch.long),
            "id": torch.tensor(self.ids, dtype=torch.long),
            "bad": self.bad,
            **extra,
        }


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, picklable: the layout and how to turn bytes into tensors."""

    shards: tuple[ShardRef, ...]
    plans: tuple[WorkerPlan, ...]
    seed: int
    epoch: int
    shuffle_buffer: int
    transform: Transform
    collate: Collate
    # Per worker, what was consumed under this layout: (samples read, positions read but not
    # consumed). Everything else read is dropped after the shuffle. None at a layout's start.
    skip: tuple[tuple[int, frozenset[int]], ...] | None
    skip_slots: int  # batches the rank already yielded
    grouper: Grouper | None = None


_DONE = object()  # a consumed sample replayed through the shuffle without reading its bytes


def _gid(item: dict | _Bad) -> int:
    return item.gid if isinstance(item, _Bad) else item["__gid__"]


def _pos(item: dict | _Bad) -> int:
    return item.pos if isinstance(item, _Bad) else item["__pos__"]


def _worker_stream(job: _Job, worker: int) -> tuple[Iterator[dict | _Bad], list[int]]:
    """The worker's raw samples: its stretch of shards, shuffled, minus what was consumed; and
    a one-element list counting the samples read so far (in reading order, before the shuffle),
    which is what the position records."""
    plan = job.plans[worker]
    read = [0]
    done, pending = job.skip[worker] if job.skip is not None else (0, frozenset())
    # Every sample before the first pending one was consumed: the shuffle gets placeholders
    # for them (it draws the same random numbers either way), and their shards are not read.
    floor = min(pending, default=done)

    def raw() -> Iterator[dict | _Bad]:
        for shard_index, ranges in _by_shard(plan.segments):
            n = sum(end - first for first, end in ranges)
            if read[0] + n <= floor:
                for _ in range(n):
                    read[0] += 1
                    yield _DONE
                continue
            for item in _read_ranges(job.shards[shard_index], ranges):
                if isinstance(item, _Bad):
                    item.pos = read[0]
                else:
                    item["__pos__"] = read[0]
                read[0] += 1
                yield item

    stream: Iterator[Any] = raw()
    if job.shuffle_buffer > 1:
        rng = random.Random(_seed(job.seed, job.epoch, worker, 2))
        stream = _shuffle(stream, job.shuffle_buffer, job.shuffle_buffer, rng=rng)
    if job.skip is not None:
        stream = (
            item
            for item in stream
            if item is not _DONE and (_pos(item) >= done or _pos(item) in pending)
        )
    return stream, read


def _worker_batches(job: _Job, worker: int) -> Iterator[dict]:
    """The batches of one worker, in its order, each tagged with its output slot, its worker
    and how many samples the worker had read when it was complete."""
    if job.grouper is not None:
        yield from _worker_groups(job, worker)
        return
    plan = job.plans[worker]
    todo = [(j, s) for j, s in enumerate(plan.slots) if s >= job.skip_slots]
    if not todo:
        return
    stream, read = _worker_stream(job, worker)

    spare: tuple[bytes, int, int] | None = None  # what padding repeats, found when first needed
    for j, slot in todo:
        batch = _Batch()
        while len(batch) < plan.sizes[j]:
            item = next(stream, None)
            if item is None:
                break
            rng = np.random.default_rng(_seed(job.seed, job.epoch, _gid(item), 3))
            batch.add(item, job.transform, rng)
        while len(batch) < plan.sizes[j]:  # padding: the same number of batches on every rank
            spare = spare or _spare(job, plan)
            image, label, spare_gid = spare
            rng = np.random.default_rng(_seed(job.seed, job.epoch, spare_gid, 4, slot, len(batch)))
            batch.views.append(job.transform(image, rng))
            batch.labels.append(label)
            batch.ids.append(-1)
        yield batch.finish(job.collate, slot=slot, worker=worker, read=read[0])


def _worker_groups(job: _Job, worker: int) -> Iterator[dict]:
    """Grouped batches (buckets, NaViT): as many as the worker's samples make, in its order."""
    bad: list[_Bad] = []
    stream, read = _worker_stream(job, worker)

    def good() -> Iterator[dict]:
        for item in stream:
            if isinstance(item, _Bad):
                bad.append(item)
            else:
                yield item

    carried: list[tuple[int, str, str, str]] = []  # bad-sample reports not yet sent
    for group in job.grouper(good()):
        batch = _Batch()
        for item, shape in group:
            rng = np.random.default_rng(_seed(job.seed, job.epoch, item["__gid__"], 3))
            batch.add(item, job.transform, rng, shape)
        carried += [(b.gid, b.shard, b.key, b.reason) for b in bad] + batch.bad
        bad.clear()
        if len(batch):
            batch.bad, carried = carried, []
            yield batch.finish(job.collate, slot=-1, worker=worker, read=read[0])
    carried += [(b.gid, b.shard, b.key, b.reason) for b in bad]
    if carried:  # reports only: the main process counts them and yields nothing
        empty = torch.empty(0, dtype=torch.long)
        yield {"views": None, "id": empty, "bad": carried, "slot": -1, "worker": worker,
               "read": read[0]}  # fmt: skip


def _spare(job: _Job, plan: WorkerPlan) -> tuple[bytes, int, int]:
    """The sample padding repeats: the first readable one of the worker's stretch (else of all
    shards), chosen the same way whatever was consumed, so a resumed run pads identically."""
    ranges = [*plan.segments, *((i, 0, s.samples) for i, s in enumerate(job.shards))]
    for shard_index, first, end in ranges:
        for item in _read_ranges(job.shards[shard_index], [(first, end)]):
            if isinstance(item, _Bad):
                continue
            try:
                image = _image_bytes(item)
                job.transform(image, np.random.default_rng(0))
            except Exception:
                continue
            return image, _label(item), item["__gid__"]
    raise DataError(f"epoch {job.epoch}: no readable sample in any shard to pad batches with")


class _EpochDataset(IterableDataset):
    """One rank's epoch; each DataLoader worker runs its own `WorkerPlan`."""

    def __init__(self, job: _Job) -> None:
        self.job = job

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            yield from _worker_batches(self.job, info.id)
            return
        # No worker processes: run the logical workers here, in the same interleaved order.
        streams = {w: _worker_batches(self.job, w) for w in range(len(self.job.plans))}
        while streams:
            for w in list(streams):
                batch = next(streams[w], None)
                if batch is None:
                    del streams[w]
                else:
                    yield batch


def _resampled_batches(
    shards: tuple[ShardRef, ...],
    seed: int,
    stream_seed: int,
    batch_size: int,
    shuffle_buffer: int,
    transform: Transform,
    collate: Collate,
) -> Iterator[dict]:
    """Endless batches: shards drawn with replacement, samples shuffled, crops seeded per draw."""
    info = get_worker_info()
    worker = info.id if info is not None else 0
    picker = random.Random(_seed(seed, stream_seed, worker, 5))

    def raw() -> Iterator[dict | _Bad]:
        while True:
            shard = shards[picker.randrange(len(shards))]
            yield from _read_ranges(shard, [(0, shard.samples)])

    stream = _shuffle(raw(), max(shuffle_buffer, 1), max(shuffle_buffer, 1), rng=picker)
    draw = 0
    while True:
        batch = _Batch()
        while len(batch) < batch_size:
            draw += 1
            rng = np.random.default_rng(_seed(seed, stream_seed, worker, draw, 6))
            batch.add(next(stream), transform, rng)
        yield batch.finish(collate)


class _ResampledDataset(IterableDataset):
    def __init__(self, **kw: Any) -> None:
        self.kw = kw

    def __iter__(self) -> Iterator[dict]:
        return _resampled_batches(**self.kw)


# ---------------------------------------------------------------------------------------------
# Main process


@dataclass
class _Position:
    """Where the rank stands in the current epoch.

    The epoch starts with a layout computed from (seed, epoch, world size, workers, batch size);
    a resume at another layout shares out what the last one left. Under a layout, the samples
    this rank consumed are, per worker, the first `read` of the worker's reading order except
    the `pending` positions (read into a shuffle buffer or a bucket, not yet in a batch): a few
    numbers per worker, whatever the size of the data set.
    """

    epoch: int = 0
    # A layout made from what an earlier one left: per worker its reading order as (first id,
    # length) runs, the number of samples shared, and the (rank, world size) they were shared
    # over. None: the epoch's own layout, minus `done` (intervals; positions of old versions).
    runs: list[np.ndarray] | None = None
    remaining: int = 0
    split: tuple[int, int] = (0, 1)
    done: np.ndarray | None = None
    read: list[int] = field(default_factory=list)  # per worker of the current layout
    pending: list[set[int]] = field(default_factory=list)  # per worker: reading positions
    batches: int = 0  # batches yielded under the current layout
    stats: Counter = field(default_factory=Counter)  # whole run: samples, padding, bad
    bad: Counter = field(default_factory=Counter)  # this epoch: bad samples per shard


def _ints(data: torch.Tensor) -> np.ndarray:
    """An int64 array from a saved tensor."""
    return data.numpy().astype(np.int64).reshape(-1)


def _positions(pending: set[int]) -> torch.Tensor:
    """Reading positions, sorted, in 4 bytes each where they fit (they are per worker)."""
    small = max(pending, default=0) < 2**31
    return torch.tensor(sorted(pending), dtype=torch.int32 if small else torch.int64)


class ShardLoader:
    """Batches for one rank, with a resumable position. Iterating runs the rest of one epoch.

    Each batch is a dict: `views` (list of uint8 (B, 4, H, W) RGBX tensors, or whatever `collate`
    makes: a `CropBatch` for crops cut on the device), `label` (B,) with -1 for unlabelled, `id`
    (B,) global sample ids with -1 for padding repeats.
    """

    def __init__(
        self,
        shards: str | Sequence[ShardRef],
        *,
        transform: Transform,
        collate: Collate,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        workers: int = 0,
        mode: Literal["exact", "resampled"] = "exact",
        shuffle_buffer: int = 0,
        max_bad_fraction: float = 0.001,
        steps_per_epoch: int | None = None,
        grouper: Grouper | None = None,
        agree: Callable[[bool], bool] | None = None,
        pin_memory: bool = False,
        prefetch: Callable[[dict], dict] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shards = tuple(resolve_shards(shards) if isinstance(shards, str) else shards)
        self.total = sum(s.samples for s in self.shards)
        self.transform, self.collate = transform, collate
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.workers, self.mode = seed, workers, mode
        self.shuffle_buffer, self.max_bad_fraction = shuffle_buffer, max_bad_fraction
        # Grouped batches (buckets, NaViT) come in numbers that depend on the data, so ranks
        # agree on the epoch end through `agree(has_batch) -> every rank has one` (a collective
        # the trainer passes in; None on a single rank).
        self.grouper, self.agree = grouper, agree
        if grouper is not None and mode != "exact":
            raise ValueError("grouped batches (buckets, NaViT) need mode='exact'")
        # Resampled mode has no natural epoch; an "epoch" is this many batches.
        self.steps_per_epoch = steps_per_epoch or -(-self.total // (batch_size * world_size))
        # Crops cut on the device: batches come pinned (page-locked) and `prefetch` starts each
        # batch's copy to the device one batch ahead of handing it out (see `_ahead`).
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.pos = _Position()
        self._cached: tuple | None = None

    # Layout --------------------------------------------------------------------------------

    def plan(self) -> RankPlan:
        """This rank's layout of the current epoch."""
        return self._layout()[0]

    def _layout(self) -> tuple[RankPlan, list[np.ndarray], list[RawIndex]]:
        """The plan, each worker's reading order (runs) and its index, once per layout."""
        pos, cached = self.pos, self._cached
        if cached is None or cached[:3] != (pos.epoch, id(pos.runs), id(pos.done)):
            if pos.runs is None:
                plan = plan_epoch(
                    self.shards,
                    seed=self.seed,
                    epoch=pos.epoch,
                    rank=self.rank,
                    world_size=self.world_size,
                    workers=self.workers,
                    batch_size=self.batch_size,
                    done=pos.done,
                )
                runs = [layout.runs_of(self.shards, w.segments) for w in plan.workers]
            else:
                rank, world_size = pos.split
                plan = layout.plan_runs(
                    self.shards,
                    pos.runs,
                    remaining=pos.remaining,
                    rank=rank,
                    world_size=world_size,
                    batch_size=self.batch_size,
                )
                runs = pos.runs
            # Keyed by identity: a new layout is always new objects (the cache holds them, so
            # their ids cannot be reused while it does).
            index = [RawIndex(r) for r in runs]
            key = (pos.epoch, id(pos.runs), id(pos.done))
            self._cached = cached = (*key, plan, runs, index, pos.runs, pos.done)
        return cached[3], cached[4], cached[5]

    def __len__(self) -> int:
        """Batches left in the current epoch (grouped batches: the fixed-size estimate)."""
        if self.mode == "resampled":
            return self.steps_per_epoch - self.pos.batches
        return self.plan().batches - self.pos.batches

    @property
    def epoch(self) -> int:
        return self.pos.epoch

    # Iteration -----------------------------------------------------------------------------

    def _loader(self, dataset: IterableDataset) -> Iterator[dict]:
        return self._ahead(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.workers,
                persistent_workers=False,
                prefetch_factor=2 if self.workers else None,
                pin_memory=self.pin_memory,
                # Workers seed what they draw themselves; their base seed comes from a generator
                # of their own, not the global one (whose state a checkpoint saves: starting an
                # epoch must not move it, or a resumed run's drop path would differ).
                generator=torch.Generator().manual_seed(self.seed),
            )
        )

    def _ahead(self, batches: Iterable[dict]) -> Iterator[dict]:
        """The workers' batches; with `prefetch`, each one is passed to it (a non-blocking copy
        to the device) when it arrives, and handed out only once the next one has arrived too:
        the next batch's copy then runs during the current step. The position counts a batch
        when it is handed out (`_account`), so the one read ahead is not consumed."""
        if self.prefetch is None:
            yield from batches
            return
        held = None
        for batch in batches:
            batch = self.prefetch(batch) if batch.get("views") is not None else batch
            if held is not None:
                yield held
            held = batch
        if held is not None:
            yield held

    def __iter__(self) -> Iterator[dict]:
        if self.mode == "resampled":
            yield from self._iter_resampled()
        elif self.grouper is not None:
            yield from self._iter_grouped()
        else:
            yield from self._iter_exact()
        self.pos = _Position(epoch=self.pos.epoch + 1, stats=self.pos.stats)

    def _start_layout(self, workers: int) -> None:
        if len(self.pos.read) != workers:
            self.pos.read = [0] * workers
            self.pos.pending = [set() for _ in range(workers)]

    def _iter_exact(self) -> Iterator[dict]:
        plan = self.plan()
        self._start_layout(len(plan.workers))
        if plan.padding:
            log.info(
                "epoch %d: rank %d repeats %d sample(s) so every rank takes %d batches",
                self.pos.epoch, self.rank, plan.padding, plan.batches,
            )  # fmt: skip
        # Mid-epoch (a resume, or iterating again after a break) the workers replay the layout
        # and drop what this rank consumed: what follows is what an uninterrupted run yields.
        skip = None
        if self.pos.batches:
            skip = tuple(zip(self.pos.read, map(frozenset, self.pos.pending), strict=True))
        job = _Job(
            self.shards, plan.workers, self.seed, self.pos.epoch, self.shuffle_buffer,
            self.transform, self.collate, skip, self.pos.batches,
        )  # fmt: skip
        pending: dict[int, dict] = {}
        for batch in self._loader(_EpochDataset(job)):
            pending[batch["slot"]] = batch
            while self.pos.batches in pending:
                yield self._account(pending.pop(self.pos.batches), plan.real + plan.padding)
        if pending or self.pos.batches != plan.batches:
            raise DataError(
                f"epoch {self.pos.epoch}: rank {self.rank} produced {self.pos.batches} of "
                f"{plan.batches} batches"
            )

    def _iter_grouped(self) -> Iterator[dict]:
        if any(self.pos.read):
            # Mid-epoch: what this rank left is laid out afresh over its workers (grouping is
            # not replayable by count).
            runs, remaining = self._relayout([self.state_dict()], rank=0, world_size=1)
            self.pos = _Position(
                epoch=self.pos.epoch, runs=runs, remaining=remaining, split=(0, 1),
                stats=self.pos.stats, bad=self.pos.bad,
            )  # fmt: skip
        plan = self.plan()
        self._start_layout(len(plan.workers))
        job = _Job(
            self.shards, plan.workers, self.seed, self.pos.epoch, self.shuffle_buffer,
            self.transform, self.collate, None, 0, self.grouper,
        )  # fmt: skip
        expected = plan.real + plan.padding
        for batch in self._loader(_EpochDataset(job)):
            if batch["views"] is None:  # bad-sample reports only
                self._account(batch, expected)
                continue
            if self.agree is not None and not self.agree(True):
                log.info("epoch %d: another rank ran out of batches; ending the epoch", self.epoch)
                return
            yield self._account(batch, expected)
        if self.agree is not None:
            self.agree(False)  # the others' pending agree(True) now returns False

    def _iter_resampled(self) -> Iterator[dict]:
        dataset = _ResampledDataset(
            shards=self.shards,
            seed=self.seed,
            stream_seed=_seed(self.pos.epoch, self.pos.batches, self.rank),
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            transform=self.transform,
            collate=self.collate,
        )
        expected = self.steps_per_epoch * self.batch_size
        for batch in self._loader(dataset):
            if self.pos.batches >= self.steps_per_epoch:
                break
            yield self._account(batch, expected)

    def _account(self, batch: dict, expected: int) -> dict:
        """Record a batch as consumed, count bad samples, stop when too many are bad."""
        stats = self.pos.stats
        ids = batch["id"]
        bad = batch.pop("bad")
        worker = batch.pop("worker", None)
        if worker is not None:  # exact and grouped modes: move the worker's position on
            read, pending = batch.pop("read"), self.pos.pending[worker]
            pending.update(range(self.pos.read[worker], read))
            self.pos.read[worker] = read
            gids = [*ids[ids >= 0].tolist(), *(b[0] for b in bad)]
            if gids:
                index = self._layout()[2][worker]
                pending.difference_update(index.positions(np.array(gids)).tolist())
        stats["samples"] += int((ids >= 0).sum())
        stats["padding"] += int((ids < 0).sum())
        for _, shard, key, reason in bad:
            stats["bad"] += 1
            stats[f"bad:{shard}"] += 1
            log.warning("skipping bad sample %s in %s: %s", key, shard, reason)
            # The budget is a share of one epoch's samples, so it counts this epoch's bad ones
            # only (the same few corrupt images come back every epoch).
            self.pos.bad[shard] += 1
            n_bad = sum(self.pos.bad.values())
            if n_bad > self.max_bad_fraction * expected:
                worst, most = self.pos.bad.most_common(1)[0]
                raise DataError(
                    f"{n_bad} bad samples in epoch {self.pos.epoch} on rank {self.rank} "
                    f"exceed data.max_bad_fraction={self.max_bad_fraction} of {expected}; most "
                    f"in {worst} ({most}), last: {key} in {shard} ({reason})"
                )
        batch.pop("slot", None)
        if batch["views"] is not None:
            self.pos.batches += 1
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """Samples, padding repeats and bad samples seen (per shard under `bad:<name>`)."""
        return dict(self.pos.stats)

    # Position ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's position; save one per rank and pass them all to `load_state_dict`.

        Its size does not grow with the data set: the layout's parameters, each worker's
        reading order as runs (a few per shard it reads), how far it read, the positions still
        pending (at most a shuffle buffer and a bucket's worth) and how many samples it left."""
        plan, runs, _ = self._layout()
        self._start_layout(len(plan.workers))
        pos = self.pos
        left = [int(r[:, 1].sum()) - n + len(p) for r, n, p in zip(runs, pos.read, pos.pending,
                                                                    strict=True)]  # fmt: skip
        # What the layout shared out: the epoch's own layout shares everything not done before.
        remaining = pos.remaining if pos.runs is not None else self.total - layout.count(pos.done)
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "epoch": pos.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "total": self.total,
            "batches": pos.batches,
            "remaining": remaining,
            "split": list(pos.split if pos.runs is not None else (self.rank, self.world_size)),
            # Tensors, not bytes: a rank file read memory-mapped reads these only when used.
            "runs": [torch.from_numpy(r.astype(np.int64)) for r in runs],
            "read": list(pos.read),
            "pending": [_positions(p) for p in pos.pending],
            "left": left,
            "bad": dict(pos.bad),  # this epoch's bad samples per shard, so far
        }

    def load_state_dict(self, states: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Resume from the states of every rank of the run that saved them (any world size).

        `states` may load each rank's state when indexed: at the same layout only this rank's
        and rank 0's are read; at another one every rank's is read."""
        states = [states] if isinstance(states, dict) else states
        first = states[0]
        if first["total"] != self.total:
            raise DataError(
                f"the saved data position covers {first['total']} samples but the shards now "
                f"hold {self.total}: resume with the shards the run started with"
            )
        pos = _Position(epoch=first["epoch"], stats=self.pos.stats)
        version = first.get("version", 1)
        same = (
            version == STATE_VERSION
            and first["mode"] == self.mode
            and len(states) == self.world_size
            and (first["world_size"], first["workers"], first["batch_size"], first["seed"])
            == (self.world_size, self.workers, self.batch_size, self.seed)
        )
        if self.mode == "resampled":
            pos.batches = first["batches"]
        elif same and self.grouper is None:
            mine = states[self.rank]
            if (mine["epoch"], mine["batches"]) != (first["epoch"], first["batches"]):
                raise DataError(
                    "the saved per-rank data positions disagree on epoch or batch count"
                )
            pos.runs = [_ints(r).reshape(-1, 2) for r in mine["runs"]]
            pos.remaining, pos.split = int(mine["remaining"]), tuple(mine["split"])
            pos.read = list(mine["read"])
            pos.pending = [set(_ints(p).tolist()) for p in mine["pending"]]
            pos.batches = mine["batches"]
            # Same layout: the same samples are left, so the epoch's budget goes on. (A fresh
            # layout gets a fresh budget over what is left.)
            pos.bad = Counter(mine.get("bad") or {})
        else:
            everyone = [states[r] for r in range(len(states))]
            if len({(s["epoch"], s["batches"]) for s in everyone}) != 1:
                raise DataError(
                    "the saved per-rank data positions disagree on epoch or batch count"
                )
            if version == 1:
                pos.done = self._done_v1(everyone)
                left = self.total - layout.count(pos.done)
            else:
                pos.runs, left = self._relayout(everyone, self.rank, self.world_size)
                pos.remaining, pos.split = left, (self.rank, self.world_size)
            log.info(
                "data position: re-laying out %d unseen samples of epoch %d over %d ranks",
                left, pos.epoch, self.world_size,
            )  # fmt: skip
        self.pos = pos
        self._cached = None

    def _relayout(
        self, states: Sequence[dict[str, Any]], rank: int, world_size: int
    ) -> tuple[list[np.ndarray], int]:
        """This rank's workers' reading orders (runs) in a layout of what the ranks that saved
        `states` left, shared over `world_size` ranks; and how many samples are shared.

        The leftovers are taken in saved-rank, then worker order; each one is what the worker
        had read but not consumed, then what it had not read. Only the counts come from every
        state; the runs only from the states whose leftovers this rank takes."""
        owners = [(st, w) for st in states for w in range(len(st["left"]))]
        cum = np.cumsum([0, *(int(n) for st in states for n in st["left"])])
        remaining = int(cum[-1])
        sp = layout.split(remaining, rank=rank, world_size=world_size, workers=self.workers,
                          batch_size=self.batch_size)  # fmt: skip
        runs = []
        for lo, hi in sp.ranges:
            parts = [layout.EMPTY]
            k0 = int(np.searchsorted(cum, lo, side="right")) - 1
            for k in range(max(k0, 0), int(np.searchsorted(cum, hi, side="left"))):
                a, b = max(lo, int(cum[k])), min(hi, int(cum[k + 1]))
                if a >= b:
                    continue
                st, w = owners[k]
                left = layout.remainder(
                    _ints(st["runs"][w]).reshape(-1, 2), st["read"][w], _ints(st["pending"][w])
                )
                parts.append(layout.slice_runs(left, a - int(cum[k]), b - int(cum[k])))
            runs.append(layout.compact(np.concatenate(parts)))
        return runs, remaining

    def _done_v1(self, states: Sequence[dict[str, Any]]) -> np.ndarray | None:
        """Intervals of what was consumed, from positions saved as bitmaps of the data set."""
        masks = [
            np.unpackbits(np.frombuffer(st[k], dtype=np.uint8), count=self.total)
            for st in states
            for k in ("excluded", "consumed")
            if st[k] is not None
        ]
        done = layout.union(*(layout.from_bitmap(m) for m in masks))
        return done if len(done) else None

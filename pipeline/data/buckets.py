"""Resolution buckets and NaViT grouping: which shape each sample's crops get, and which samples
share a batch.

This module works on sample metadata only (the original width and height stored in the shard's
json). It holds

- the bucket set: one (height, width) per requested aspect ratio, sides multiples of the stride,
  area near a pixel budget (`make_buckets`, `buckets_from_config`);
- assignment of an image to the bucket nearest its aspect in log space (`assign_bucket`), the
  local-crop shape that goes with a bucket (`local_shape`) and per-bucket batch sizes that hold a
  token budget per batch (`bucket_batch_sizes`);
- `BucketBatcher`: a streaming grouper that emits single-bucket batches, with waste statistics;
- NaViT mode: native-resolution shapes capped in size (`navit_shape`) and `NaViTBatcher`, which
  groups images so that `pipeline.data.packing.pack_images` packs each group into a fixed number
  of rows.

It deliberately does not decode, crop, shuffle or collate, draws no random numbers (the order of
its output is a pure function of the order of its input) and knows nothing of ranks or workers:
the loader calls it inside each worker, on that worker's stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pipeline.config import BucketsConfig

T = TypeVar("T")

# Aspect distances are differences of float logs, so two mathematically equal distances (2:1
# between aspects 1 and 4) need not compare equal; anything closer than this is a tie.
_TIE_EPS = 1e-9


def _round_half_up(x: float) -> int:
    """Nearest integer, halves rounded up (Python's `round` rounds halves to even)."""
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class Bucket:
    """One crop shape in pixels. Sides are multiples of the stride it was made for."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        """Width over height."""
        return self.width / self.height

    def tokens(self, stride: int) -> int:
        """Patch tokens of a crop of this shape: (height / stride) * (width / stride)."""
        if self.height % stride or self.width % stride:
            raise ValueError(f"bucket {self.height}x{self.width} is not a multiple of {stride}")
        return (self.height // stride) * (self.width // stride)

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


# ---------------------------------------------------------------------------------------------
# The bucket set.


def _grid_for(ratio: float, tokens: float) -> tuple[int, int]:
    """Grid (rows, cols) of patches: the ideal sqrt(tokens / ratio) x sqrt(tokens * ratio), each
    side rounded to the nearest integer (halves up), at least 1."""
    rows = max(1, _round_half_up(math.sqrt(tokens / ratio)))
    cols = max(1, _round_half_up(math.sqrt(tokens * ratio)))
    return rows, cols


def make_buckets(aspect_ratios: Sequence[float], pixel_budget: int, stride: int) -> list[Bucket]:
    """One bucket per distinct (after rounding) aspect ratio (width / height), in request order.

    Rounding rule: the ideal sides sqrt(budget / r) x sqrt(budget * r) are each rounded to the
    nearest multiple of `stride` (halves up, at least one stride). Each side is then within half
    a stride of its ideal, which bounds the aspect error and keeps the area within one stride row
    or column of the budget: it never exceeds pixel_budget + stride * max(height, width). It is
    not always the area nearest the budget: picking the nearest area first was tried and gives
    the ratio away on small grids (at 96 px and stride 16, 4/3 became the 6x6 square; this rule
    gives 5x7). Ratios that round to the same shape give one
    bucket, at the first request's position.
    """
    if stride < 1 or pixel_budget < stride * stride:
        raise ValueError(f"pixel_budget={pixel_budget} must hold at least one {stride}px patch")
    if not aspect_ratios or any(r <= 0 for r in aspect_ratios):
        raise ValueError(f"aspect_ratios={list(aspect_ratios)} must be a non-empty list of >0")
    tokens = pixel_budget / stride**2
    buckets: list[Bucket] = []
    for ratio in aspect_ratios:
        rows, cols = _grid_for(ratio, tokens)
        bucket = Bucket(height=rows * stride, width=cols * stride)
        if bucket not in buckets:
            buckets.append(bucket)
    return buckets


def buckets_from_config(cfg: BucketsConfig, crop_size: int, stride: int) -> list[Bucket]:
    """Buckets for `data.buckets`: budget `token_budget * stride**2` pixels, else `crop_size**2`."""
    budget = cfg.token_budget * stride**2 if cfg.token_budget is not None else crop_size**2
    return make_buckets(cfg.aspect_ratios, budget, stride)


def batch_tokens_from_config(
    cfg: BucketsConfig, batch_size: int, crop_size: int, stride: int
) -> int:
    """Tokens per batch for `data.buckets`: `batch_tokens` if set, else `batch_size` crops of
    the per-crop budget (`token_budget`, or a square crop's (crop_size // stride)**2 tokens),
    so a square bucket's batch size stays `batch_size`."""
    if cfg.batch_tokens is not None:
        return cfg.batch_tokens
    per_crop = cfg.token_budget if cfg.token_budget is not None else (crop_size // stride) ** 2
    return batch_size * per_crop


# ---------------------------------------------------------------------------------------------
# Assignment, local crops, batch sizes.


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket nearest the image's aspect: min |log(w/h) - log(bw/bh)|.

    Ties go to the squarer bucket (smaller |log aspect|), then to the lower index.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    if not buckets:
        raise ValueError("no buckets to assign to")
    target = math.log(width / height)
    best, best_key = 0, (math.inf, math.inf)
    for i, b in enumerate(buckets):
        log_b = math.log(b.aspect)
        dist, squareness = abs(target - log_b), abs(log_b)
        # A strictly nearer bucket wins; within _TIE_EPS the squarer one does.
        if dist < best_key[0] - _TIE_EPS or (
            dist <= best_key[0] + _TIE_EPS and squareness < best_key[1] - _TIE_EPS
        ):
            best, best_key = i, (dist, squareness)
    return best


def local_shape(bucket: Bucket, global_size: int, local_size: int, stride: int) -> tuple[int, int]:
    """(h, w) of a local crop for `bucket`: the bucket scaled by local_size / global_size, each
    side rounded to the nearest multiple of `stride` (halves up), at least `stride`."""
    scale = local_size / global_size
    h = max(1, _round_half_up(bucket.height * scale / stride)) * stride
    w = max(1, _round_half_up(bucket.width * scale / stride)) * stride
    return h, w


def bucket_batch_sizes(
    buckets: Sequence[Bucket], batch_tokens: int, stride: int, max_batch: int | None = None
) -> list[int]:
    """Images per batch for each bucket: floor(batch_tokens / bucket tokens), at least 1, at most
    `max_batch`. A batch then holds at most `batch_tokens` tokens, and less than one image's
    tokens fewer (unless capped, or one image alone exceeds the budget)."""
    sizes = []
    for b in buckets:
        n = max(1, batch_tokens // b.tokens(stride))
        sizes.append(n if max_batch is None else max(1, min(n, max_batch)))
    return sizes


# ---------------------------------------------------------------------------------------------
# Streaming bucket batcher.


@dataclass
class BucketBatch(Generic[T]):
    """Items that share one bucket. `full` is False for a batch flushed at the end of the input."""

    bucket: int
    items: list[T]
    full: bool


@dataclass
class _BucketStats:
    samples: int = 0
    full_batches: int = 0
    partial_batches: int = 0
    waste_sum: float = 0.0  # sum over this bucket's batches of their waste fraction


class _Streaming(Generic[T]):
    """`batches(items)`: every batch as soon as `add` completes one, then what `flush` leaves."""

    def add(self, item: T) -> Any:
        raise NotImplementedError

    def flush(self) -> Iterator[Any]:
        raise NotImplementedError

    def batches(self, items: Iterable[T]) -> Iterator[Any]:
        for item in items:
            batch = self.add(item)
            if batch is not None:
                yield batch
        yield from self.flush()

    def __call__(self, items: Iterable[T]) -> Iterator[Any]:
        return self.batches(items)


class BucketBatcher(_Streaming[T]):
    """Groups a stream of items into single-bucket batches.

    Keeps one pending list per bucket; a bucket's list is emitted as soon as it reaches that
    bucket's batch size, and what is left is flushed (as `full=False` batches, in bucket order)
    when the input ends. At most sum(batch_sizes) - len(buckets) items are pending at any time.

    Padding waste of a batch is (batch_tokens - tokens in the batch) / batch_tokens: the share of
    the token budget it leaves unused. It is negative only where one image alone exceeds the
    budget (batch size 1).
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        size_of: Callable[[T], tuple[int, int]],
        *,
        batch_tokens: int,
        stride: int,
        max_batch: int | None = None,
    ) -> None:
        """`size_of(item)` gives the item's ORIGINAL (width, height)."""
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens={batch_tokens} must be >= 1")
        self.buckets = list(buckets)
        self.size_of = size_of
        self.batch_tokens = batch_tokens
        self.stride = stride
        self.batch_sizes = bucket_batch_sizes(self.buckets, batch_tokens, stride, max_batch)
        self._tokens = [b.tokens(stride) for b in self.buckets]
        self._pending: list[list[T]] = [[] for _ in self.buckets]
        self._stats = [_BucketStats() for _ in self.buckets]

    @property
    def num_pending(self) -> int:
        """Items taken in but not yet emitted."""
        return sum(len(p) for p in self._pending)

    def pending(self) -> list[list[T]]:
        """Copies of the pending lists, per bucket (e.g. to record their keys at a checkpoint)."""
        return [list(p) for p in self._pending]

    def add(self, item: T) -> BucketBatch[T] | None:
        """Take one item; return its bucket's batch if this item completed it."""
        width, height = self.size_of(item)
        b = assign_bucket(width, height, self.buckets)
        self._stats[b].samples += 1
        self._pending[b].append(item)
        if len(self._pending[b]) >= self.batch_sizes[b]:
            return self._emit(b, full=True)
        return None

    def flush(self) -> Iterator[BucketBatch[T]]:
        """Emit every non-empty pending list as a partial batch, in bucket order."""
        for b in range(len(self.buckets)):
            if self._pending[b]:
                yield self._emit(b, full=False)

    def _emit(self, b: int, *, full: bool) -> BucketBatch[T]:
        items, self._pending[b] = self._pending[b], []
        st = self._stats[b]
        if full:
            st.full_batches += 1
        else:
            st.partial_batches += 1
        st.waste_sum += self._waste(b, len(items))
        return BucketBatch(bucket=b, items=items, full=full)

    def _waste(self, b: int, n: int) -> float:
        return (self.batch_tokens - n * self._tokens[b]) / self.batch_tokens

    def stats(self) -> dict[str, Any]:
        """Counts so far: per bucket and overall samples, full/partial batches, padding waste
        (mean over batches, and total = unused tokens / token capacity of all batches)."""
        per_bucket = []
        total_batches = wasted_tokens = 0
        total_waste = 0.0
        for b, st in enumerate(self._stats):
            n_batches = st.full_batches + st.partial_batches
            emitted = st.samples - len(self._pending[b])
            waste = n_batches * self.batch_tokens - emitted * self._tokens[b]
            per_bucket.append(
                {
                    "height": self.buckets[b].height,
                    "width": self.buckets[b].width,
                    "tokens": self._tokens[b],
                    "batch_size": self.batch_sizes[b],
                    "samples": st.samples,
                    "full_batches": st.full_batches,
                    "partial_batches": st.partial_batches,
                    "padding_waste_mean": st.waste_sum / n_batches if n_batches else 0.0,
                }
            )
            total_batches += n_batches
            total_waste += st.waste_sum
            wasted_tokens += waste
        capacity = total_batches * self.batch_tokens
        return {
            "buckets": per_bucket,
            "samples": sum(st.samples for st in self._stats),
            "batches": total_batches,
            "full_batches": sum(st.full_batches for st in self._stats),
            "partial_batches": sum(st.partial_batches for st in self._stats),
            "pending": self.num_pending,
            "padding_waste_mean": total_waste / total_batches if total_batches else 0.0,
            "padding_waste_total": wasted_tokens / capacity if capacity else 0.0,
            "wasted_tokens": wasted_tokens,
        }

    def summary(self) -> str:
        """One line per bucket, for the log."""
        s = self.stats()
        lines = []
        for i, b in enumerate(s["buckets"]):
            lines.append(
                f"bucket {i} {b['height']}x{b['width']} (aspect {b['width'] / b['height']:.2f}, "
                f"{b['tokens']} tok, batch {b['batch_size']}): {b['samples']} samples, "
                f"{b['full_batches']} full + {b['partial_batches']} partial batches, "
                f"waste {100 * b['padding_waste_mean']:.1f}%"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# NaViT: native resolution, packed into sequences.


def navit_shape(
    width: int, height: int, patch: int, max_side: int, max_tokens: int | None = None
) -> tuple[int, int]:
    """(h, w) for an image at its native resolution, capped.

    Scale down (never up) so the longer side is <= max_side, then round each side to the nearest
    multiple of `patch` (halves up, at least one patch, and never above max_side rounded down to
    a patch multiple). Rounding thus moves a side by at most half a patch, except that a side
    under half a patch becomes one patch.
    If `max_tokens` is given and the grid still has more patches than that, the image is scaled
    down further, keeping its aspect as far as whole patches allow, until it fits.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    if max_side < patch:
        raise ValueError(f"max_side={max_side} is smaller than one patch ({patch})")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    scale = min(1.0, max_side / max(width, height))
    h_px, w_px = height * scale, width * scale
    side_cap = max_side // patch
    rows = min(side_cap, max(1, _round_half_up(h_px / patch)))
    cols = min(side_cap, max(1, _round_half_up(w_px / patch)))
    if max_tokens is not None and rows * cols > max_tokens:
        # Shrink the pixel size to the token cap, round as above; rounding can still overshoot,
        # so then drop patches from the side that is longer relative to the image's aspect.
        f = min(1.0, math.sqrt(max_tokens * patch**2 / (h_px * w_px)))
        rows = min(side_cap, max(1, _round_half_up(h_px * f / patch)))
        cols = min(side_cap, max(1, _round_half_up(w_px * f / patch)))
        aspect = w_px / h_px
        while rows * cols > max_tokens:
            if cols > 1 and (rows == 1 or cols / rows >= aspect):
                cols -= 1
            else:
                rows -= 1
    return rows * patch, cols * patch


@dataclass
class NaViTBatch(Generic[T]):
    """Items and their (h, w), in the order `pack_images` must receive them.

    `rows` is the number of sequences first-fit packing fills (<= seqs_per_batch), `tokens` the
    slots used (prefix tokens included). `full` is False for the batch flushed at the end.
    """

    items: list[tuple[T, tuple[int, int]]]
    rows: int
    tokens: int
    full: bool


@dataclass
class _NaViTStats:
    images: int = 0
    batches: int = 0
    fill_sum: float = 0.0  # sum over batches of tokens / (seqs_per_batch * seq_len)
    row_fill_sum: float = 0.0  # sum over used rows of tokens / seq_len
    rows: int = 0
    capped: int = 0  # images scaled down by max_side
    shrunk: int = 0  # images scaled down further to fit one sequence
    images_per_batch: list[int] = field(default_factory=list)


class NaViTBatcher(_Streaming[T]):
    """Groups images at native resolution so that each group packs into `seqs_per_batch` rows.

    Each item takes `num_prefix_tokens + (h/patch) * (w/patch)` slots, its shape from
    `navit_shape`. An image whose tokens would exceed `seq_len` is shrunk until it fits (counted
    in the stats as `shrunk`), never rejected. Items are placed first-fit in arrival order, as
    `pack_images` does; when the next item fits in none of the `seqs_per_batch` sequences the
    current group is emitted and a new one started with that item. The group's item order is the
    arrival order, so `pack_images` on it reproduces the same rows.
    """

    def __init__(
        self,
        size_of: Callable[[T], tuple[int, int]],
        *,
        patch: int,
        max_side: int,
        seq_len: int,
        seqs_per_batch: int,
        num_prefix_tokens: int = 0,
    ) -> None:
        """`size_of(item)` gives the item's ORIGINAL (width, height)."""
        if seq_len <= num_prefix_tokens:
            raise ValueError(
                f"seq_len={seq_len} leaves no room for patches after {num_prefix_tokens} "
                "prefix tokens"
            )
        if seqs_per_batch < 1:
            raise ValueError(f"seqs_per_batch={seqs_per_batch} must be >= 1")
        self.size_of = size_of
        self.patch = patch
        self.max_side = max_side
        self.seq_len = seq_len
        self.seqs_per_batch = seqs_per_batch
        self.num_prefix_tokens = num_prefix_tokens
        self._items: list[tuple[T, tuple[int, int]]] = []
        self._used: list[int] = []  # tokens per open sequence
        self._stats = _NaViTStats()

    def shape_of(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) an image of this original size is resized to."""
        return navit_shape(
            width, height, self.patch, self.max_side, self.seq_len - self.num_prefix_tokens
        )

    @property
    def num_pending(self) -> int:
        """Items taken in but not yet emitted."""
        return len(self._items)

    def add(self, item: T) -> NaViTBatch[T] | None:
        """Take one item; return the previous group if this item did not fit in it."""
        width, height = self.size_of(item)
        h, w = self.shape_of(width, height)
        st = self._stats
        st.images += 1
        uncapped = navit_shape(width, height, self.patch, self.max_side)
        st.shrunk += int((h, w) != uncapped)
        st.capped += int(max(width, height) > self.max_side)
        need = self.num_prefix_tokens + (h // self.patch) * (w // self.patch)

        row = self._first_fit(need)
        out = None
        if row is None:
            out = self._emit(full=True)
            row = self._first_fit(need)
        assert row is not None  # an empty group always has room: need <= seq_len
        if row == len(self._used):
            self._used.append(0)
        self._used[row] += need
        self._items.append((item, (h, w)))
        return out

    def flush(self) -> Iterator[NaViTBatch[T]]:
        """Emit the last, partly filled group, if any."""
        if self._items:
            yield self._emit(full=False)

    def _first_fit(self, need: int) -> int | None:
        for r, used in enumerate(self._used):
            if used + need <= self.seq_len:
                return r
        return len(self._used) if len(self._used) < self.seqs_per_batch else None

    def _emit(self, *, full: bool) -> NaViTBatch[T]:
        st = self._stats
        tokens = sum(self._used)
        st.batches += 1
        st.rows += len(self._used)
        st.fill_sum += tokens / (self.seqs_per_batch * self.seq_len)
        st.row_fill_sum += tokens / self.seq_len
        st.images_per_batch.append(len(self._items))
        batch = NaViTBatch(items=self._items, rows=len(self._used), tokens=tokens, full=full)
        self._items, self._used = [], []
        return batch

    def stats(self) -> dict[str, Any]:
        """Fill ratio (used slots / seqs_per_batch * seq_len, mean over batches), fill of the
        rows actually used, images per batch, and how many images were capped or shrunk."""
        st = self._stats
        n = st.batches
        return {
            "images": st.images,
            "batches": n,
            "pending": self.num_pending,
            "fill_mean": st.fill_sum / n if n else 0.0,
            "row_fill_mean": st.row_fill_sum / st.rows if st.rows else 0.0,
            "images_per_batch_mean": sum(st.images_per_batch) / n if n else 0.0,
            "images_per_batch_min": min(st.images_per_batch, default=0),
            "images_per_batch_max": max(st.images_per_batch, default=0),
            "capped": st.capped,
            "shrunk": st.shrunk,
        }

    def summary(self) -> str:
        """One line, for the log."""
        s = self.stats()
        return (
            f"navit: {s['images']} images in {s['batches']} batches of {self.seqs_per_batch}x"
            f"{self.seq_len} tokens, fill {100 * s['fill_mean']:.1f}% "
            f"(used rows {100 * s['row_fill_mean']:.1f}%), "
            f"{s['images_per_batch_mean']:.1f} images/batch, "
            f"{s['capped']} capped to {self.max_side}px, {s['shrunk']} shrunk to fit"
        )

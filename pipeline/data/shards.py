"""Writing image datasets into WebDataset tar shards, their manifest, verification and loading.

This module holds

- source listing (`read_source`): a class-per-folder tree, an unlabelled folder, a `.txt` list of
  paths or a `.csv` of `path,label`;
- `write_shards`: validate every image by decoding it (in a process pool), plan a seeded shuffled
  order and the shard boundaries, then write the shards in that order, atomically and resumably;
- `verify_shards`: re-check a finished folder against its `manifest.json`;
- `load_manifest`, `Manifest`, `ShardInfo`: what the streaming loader reads.

Shard format (webdataset convention): members `{key}.{jpg|png|webp}`, `{key}.cls` (decimal label,
labelled sources only), `{key}.json` (`width`, `height` of the original image, `path` relative to
the source, plus `stored_width`/`stored_height` when the image was shrunk). The key is the 9-digit
position of the sample in the shuffled output order. Images are stored with their source bytes;
only a `max_side` shrink or a format other than JPEG/PNG/WebP re-encodes them (RGB JPEG, q95).

Output is a pure function of (inputs, arguments, Pillow version): tar headers have a fixed mtime
and owner, and the number of worker processes does not change a byte.

It deliberately does not decode for training, crop, augment or stream: that is `stream.py` and
`transforms.py`. No EXIF transpose is applied: width/height are those of the stored pixel grid.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageFile

from pipeline.fileio import HashingWriter, file_digest, write_atomic

MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.txt"
RUN_STATE_NAME = "run.json"  # args + plan fingerprint, written before the first shard
MANIFEST_VERSION = 1
# Bumped whenever the bytes written for the same inputs change; part of the plan fingerprint.
FORMAT_VERSION = 1

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
IMAGE_EXTS = ("jpg", "png", "webp")
_PASSTHROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_JPEG_QUALITY = 95
_EXIF_ORIENTATION = 0x0112

# Fixed tar header fields: with them the same samples give the same bytes on any machine.
_TAR_MTIME = 0
_TAR_OWNER = "pipeline"
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a stream-mode archive to whole records


class ShardsError(ValueError):
    """A user-facing problem with a source, an output folder or a manifest."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A shard folder's manifest: where the shards are and what they hold."""

    root: Path
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...] | None
    total_samples: int

    def path(self, shard: ShardInfo) -> str:
        """Full path of one shard."""
        return str(self.root / shard.name)


@dataclass(frozen=True)
class ShardSummary:
    """What a `write_shards` call produced (totals cover the whole output, kept shards included)."""

    written: int
    rejected: int
    shards: int
    bytes: int
    seconds: float
    inputs: int = 0
    reused: int = 0  # complete shards kept from an interrupted earlier run
    up_to_date: bool = False

    def line(self) -> str:
        """The one-line summary the command line prints."""
        if self.up_to_date:
            return f"up to date: {self.written} samples in {self.shards} shards"
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"written {self.written}, rejected {self.rejected}, shards {self.shards}, "
            f"bytes {self.bytes}, {rate:.0f} images/s"
        )
        if self.reused:
            text += f" ({self.reused} shards kept from an earlier run)"
        return text


@dataclass(frozen=True)
class SourceItem:
    """One input file: where to read it, the path recorded in the shard, its label."""

    file: str
    rel: str
    label: int | None


@dataclass(frozen=True)
class Source:
    """The listed inputs of a source, in a stable sorted order."""

    root: Path
    items: tuple[SourceItem, ...]
    classes: tuple[str, ...] | None
    labelled: bool


# --------------------------------------------------------------------------------------------
# Sources


def read_source(source: str | Path) -> Source:
    """List the inputs of a folder, `.txt` or `.csv` source; errors name the offending path."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"source not found: {src}")
    # Absolute file names: the plan (and so resume) must not depend on the working directory.
    resolved = src.resolve()
    if src.is_dir():
        result = _read_folder(resolved)
        where = "found in"
    elif src.suffix.lower() == ".txt":
        result = _read_txt(resolved)
        where = "listed in"
    elif src.suffix.lower() == ".csv":
        result = _read_csv(resolved)
        where = "listed in"
    else:
        raise ShardsError(f"source must be a folder, a .txt or a .csv file: {src}")
    if not result.items:
        raise ShardsError(f"no images {where} {src}")
    return result


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk_images(folder: Path, root: Path) -> list[str]:
    """Relative POSIX paths (to `root`) of the image files below `folder`, hidden ones skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if _is_image_name(name):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return found


def _read_folder(root: Path) -> Source:
    entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    subdirs = sorted(e.name for e in entries if e.is_dir())
    loose = [e for e in entries if e.is_file() and _is_image_name(e.name)]
    # The simple, predictable rule: only subfolders and no images at the top means one class per
    # subfolder (ImageNet style); anything else is an unlabelled tree.
    if subdirs and not loose:
        items = []
        for index, name in enumerate(subdirs):
            items += [(rel, index) for rel in _walk_images(root / name, root)]
        items.sort()
        return Source(
            root=root,
            items=tuple(SourceItem(str(root / rel), rel, label) for rel, label in items),
            classes=tuple(subdirs),
            labelled=True,
        )
    rels = sorted(_walk_images(root, root))
    return Source(
        root=root,
        items=tuple(SourceItem(str(root / rel), rel, None) for rel in rels),
        classes=None,
        labelled=False,
    )


def _resolve_listed(listing: Path, written: str) -> str:
    path = Path(written)
    return str(path if path.is_absolute() else listing.parent / path)


def _read_txt(listing: Path) -> Source:
    items = []
    with open(listing, encoding="utf-8-sig") as f:
        for line in f:
            written = line.strip()
            if written and not written.startswith("#"):
                items.append(SourceItem(_resolve_listed(listing, written), written, None))
    return Source(root=listing.parent, items=tuple(items), classes=None, labelled=False)


def _read_csv(listing: Path) -> Source:
    rows: list[tuple[int, str, str]] = []
    with open(listing, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            line = reader.line_num
            # An optional header: a first row whose path is no image path and label no integer.
            header_like = len(cells) == 2 and not cells[1].lstrip("-").isdigit()
            if not rows and header_like and not _is_image_name(Path(cells[0]).name):
                continue
            if len(cells) != 2 or not cells[0] or not cells[1]:
                raise ShardsError(f"{listing} line {line}: expected 'path,label', got {row!r}")
            rows.append((line, cells[0], cells[1]))

    def as_int(text: str) -> int | None:
        try:
            return int(text)
        except ValueError:
            return None

    # The first row decides: integer labels stay as given, names map to sorted indices.
    by_index = bool(rows) and as_int(rows[0][2]) is not None
    classes: tuple[str, ...] | None = None
    if by_index:
        labels = []
        for line, _, text in rows:
            value = as_int(text)
            if value is None or value < 0:
                raise ShardsError(
                    f"{listing} line {line}: label {text!r} is not a non-negative integer "
                    "(the first row uses integer labels)"
                )
            labels.append(value)
    else:
        classes = tuple(sorted({text for _, _, text in rows}))
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[text] for _, _, text in rows]
    items = tuple(
        SourceItem(_resolve_listed(listing, written), written, label)
        for (_, written, _), label in zip(rows, labels, strict=True)
    )
    return Source(root=listing.parent, items=items, classes=classes, labelled=True)


# --------------------------------------------------------------------------------------------
# Images (these run in the worker processes)


@dataclass(frozen=True, slots=True)
class _Scan:
    """What the validation pass learned about one input."""

    reason: str | None  # why it was rejected; None when the image is good
    ext: str = ""
    width: int = 0
    height: int = 0
    stored: tuple[int, int] | None = None  # size after a max-side shrink
    reencode: bool = False
    size: int | None = None  # bytes of the stored image, when known


@contextmanager
def _strict_decoding() -> Iterator[None]:
    # A truncated JPEG must raise, not decode to grey: someone may have flipped Pillow's global.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side at `max_side`, aspect kept."""
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    if max_side is not None and max(width, height) > max_side:
        return _fit(width, height, max_side)
    return None


def _reencode(im: Image.Image, max_side: int | None) -> bytes:
    """Decode `im` (shrunk to `max_side` if larger) and encode it as an RGB JPEG."""
    target = _target_size(*im.size, max_side)
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    icc = im.info.get("icc_profile")
    if target is not None and im.format == "JPEG":
        # Let libjpeg decode at 1/2..1/8 scale (never below the target), then resample exactly.
        im.draft("RGB", target)
    im.load()
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    rgb = im.convert("RGB")
    if target is not None and rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    extra: dict[str, Any] = {}
    if orientation != 1:
        # Keep only the orientation tag, so shrunk and passed-through JPEGs display alike.
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = orientation
        extra["exif"] = exif.tobytes()
    if icc:
        extra["icc_profile"] = icc
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=_JPEG_QUALITY, **extra)
    return out.getvalue()


def _scan(task: tuple[str, int | None, bool]) -> _Scan:
    """Validate one file by decoding it; with `need_size`, also learn its stored size."""
    path, max_side, need_size = task
    try:
        file_size = os.stat(path).st_size
    except OSError as e:
        return _Scan(reason=f"unreadable: {e.strerror or e}")
    if file_size == 0:
        return _Scan(reason="empty file")
    try:
        with _strict_decoding(), Image.open(path) as im:
            width, height = im.size
            stored = _target_size(width, height, max_side)
            reencode = stored is not None or im.format not in _PASSTHROUGH
            ext = "jpg" if reencode else _PASSTHROUGH[im.format]
            size: int | None = None
            if reencode and need_size:
                size = len(_reencode(im, max_side))  # decodes, so it validates too
            else:
                im.load()
                if not reencode:
                    size = file_size
    except Exception as e:  # any decoder failure means "not a usable image", whatever its type
        return _Scan(reason=_one_line(f"{type(e).__name__}: {e}"))
    return _Scan(None, ext, width, height, stored, reencode, size)


def _encode(task: tuple[str, int | None, bool]) -> bytes:
    """The stored bytes of one validated image: the file itself, or its re-encoding."""
    path, max_side, reencode = task
    if not reencode:
        with open(path, "rb") as f:
            return f.read()
    with _strict_decoding(), Image.open(path) as im:
        return _reencode(im, max_side)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True, slots=True)
class _Sample:
    """One sample of the plan: its source, key and the members it becomes."""

    file: str
    key: str
    ext: str
    label: int | None
    meta: bytes  # the json member
    reencode: bool
    size: int | None  # image bytes, when known before writing

    def members(self) -> list[tuple[str, int | None]]:
        """(member name, size) in the order they are written."""
        out: list[tuple[str, int | None]] = [(f"{self.key}.{self.ext}", self.size)]
        if self.label is not None:
            out.append((f"{self.key}.cls", len(str(self.label))))
        out.append((f"{self.key}.json", len(self.meta)))
        return out


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_bytes(content: int) -> int:
    """File size of a stream-mode tar whose members take `content` bytes (headers included)."""
    end = content + 2 * _TAR_BLOCK
    return -(-end // _TAR_RECORD) * _TAR_RECORD


def _sample_bytes(sample: _Sample) -> int:
    total = 0
    for _, size in sample.members():
        assert size is not None  # sizes are all known when byte limits are planned
        total += _member_bytes(size)
    return total


def _meta(item: SourceItem, scan: _Scan) -> bytes:
    meta: dict[str, Any] = {"width": scan.width, "height": scan.height, "path": item.rel}
    if scan.stored is not None:
        meta["stored_width"], meta["stored_height"] = scan.stored
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _split(samples: list[_Sample], shard_size: int, shard_bytes: int | None) -> list[list[_Sample]]:
    """Cut the ordered samples into shards; one closes when either limit would be exceeded."""
    shards: list[list[_Sample]] = []
    current: list[_Sample] = []
    content = 0
    for sample in samples:
        size = _sample_bytes(sample) if shard_bytes is not None else 0
        too_many = len(current) >= shard_size
        too_big = shard_bytes is not None and _tar_bytes(content + size) > shard_bytes
        if current and (too_many or too_big):
            shards.append(current)
            current, content = [], 0
        current.append(sample)
        content += size
    if current:
        shards.append(current)
    return shards


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _fingerprint(
    args: dict[str, Any], classes: Sequence[str] | None, plan: list[list[_Sample]]
) -> str:
    """A hash of everything that decides the output bytes: resume keeps shards only if equal."""
    digest = hashlib.sha256()
    head = {"format": FORMAT_VERSION, "pillow": PIL.__version__, "args": args, "classes": classes}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for index, shard in enumerate(plan):
        digest.update(f"\n#{index}".encode())
        for s in shard:
            row = [s.file, s.key, s.ext, s.label, s.meta.decode("utf-8"), s.reencode, s.size]
            digest.update(json.dumps(row).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing


def _read_sidecar(path: Path) -> str | None:
    """The sha256 in a `sha256sum`-style sidecar, or None when missing or malformed."""
    try:
        text = path.read_text().split()
    except OSError:
        return None
    return text[0] if text and len(text[0]) == 64 else None


def _tar_member_sizes(path: Path) -> list[tuple[str, int]] | None:
    try:
        with tarfile.open(path) as tar:
            return [(m.name, m.size) for m in tar.getmembers()]
    except (OSError, tarfile.TarError):
        return None


def _shard_is_complete(out: Path, index: int, shard: list[_Sample]) -> bool:
    """A kept shard must match its sidecar's sha256 and hold exactly the planned members."""
    path = out / _shard_name(index)
    expected = _read_sidecar(path.with_name(path.name + ".sha256"))
    if expected is None or not path.is_file() or file_digest(path)[1] != expected:
        return False
    members = _tar_member_sizes(path)
    planned = [m for s in shard for m in s.members()]
    if members is None or len(members) != len(planned):
        return False
    return all(
        name == want and (size is None or size == got)
        for (name, got), (want, size) in zip(members, planned, strict=True)
    )


def _write_shard(
    out: Path,
    index: int,
    shard: list[_Sample],
    images: Iterable[bytes],
) -> ShardInfo:
    """Write one shard under a temporary name, then its sidecar, then rename it into place."""
    import webdataset

    name = _shard_name(index)
    final = out / name
    tmp = out / (name + ".tmp")
    with open(tmp, "wb") as raw:
        hashing = HashingWriter(raw)
        writer = webdataset.TarWriter(
            hashing, user=_TAR_OWNER, group=_TAR_OWNER, mtime=_TAR_MTIME, encoder=False
        )
        for sample, image in zip(shard, images, strict=True):
            if sample.size is not None and len(image) != sample.size:
                raise RuntimeError(f"{sample.file} changed while shards were being written")
            # TarWriter.write sorts a sample's members by extension; one call per member keeps
            # the documented order (image, cls, json) under the same key.
            writer.write({"__key__": sample.key, sample.ext: image})
            if sample.label is not None:
                writer.write({"__key__": sample.key, "cls": str(sample.label).encode()})
            writer.write({"__key__": sample.key, "json": sample.meta})
        writer.close()
        sha = hashing.hexdigest()  # writes out what the hashing stream still holds
        raw.flush()
        os.fsync(raw.fileno())
    if all(s.size is not None for s in shard):
        # Byte limits were planned with _tar_bytes; a different real size would break them.
        planned = _tar_bytes(sum(_sample_bytes(s) for s in shard))
        if hashing.size != planned:
            raise RuntimeError(f"{tmp}: {hashing.size} bytes written, {planned} planned")
    write_atomic(final.with_name(name + ".sha256"), f"{sha}  {name}\n".encode())
    os.replace(tmp, final)
    return ShardInfo(name=name, samples=len(shard), bytes=hashing.size, sha256=sha)


class _Progress:
    """A minimal progress line on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.done = label, total, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            width = 30
            filled = width * self.done // max(self.total, 1)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {rate:.0f}/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextmanager
def _mapper(workers: int) -> Iterator[Callable[..., Iterator[Any]]]:
    """An ordered `imap`: in this process for one worker, over a process pool otherwise."""
    if workers <= 1:
        yield lambda fn, tasks, chunksize=1: map(fn, tasks)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield pool.imap


def _our_files(out: Path) -> list[Path]:
    """Files in OUT that this module writes (and may therefore remove)."""
    names = {MANIFEST_NAME, REJECTED_NAME, RUN_STATE_NAME}
    found = []
    for p in out.iterdir():
        base = p.name.removesuffix(".tmp")
        if base in names or (base.startswith("shard-") and ".tar" in base):
            found.append(p)
    return found


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _check_output(out: Path, args: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """Refuse to mix runs in one folder; return the finished manifest when it has our args."""
    if out.exists() and not out.is_dir():
        raise ShardsError(f"output is not a folder: {out}")
    if not out.is_dir():
        return None
    ours = _our_files(out)
    if force:
        for p in ours:
            p.unlink()
        return None
    hint = "write to a new folder, or pass --force to replace its shards"
    manifest_path, state_path = out / MANIFEST_NAME, out / RUN_STATE_NAME
    if manifest_path.exists():
        manifest = _read_json(manifest_path)
        if manifest is None:
            raise ShardsError(f"{manifest_path} is unreadable; {hint}")
        if manifest.get("args") != args:
            diff = _args_diff(args, manifest.get("args"))
            raise ShardsError(f"{out} holds shards made with other arguments ({diff}); {hint}")
        return manifest
    if state_path.exists():
        state = _read_json(state_path)
        if state is None or state.get("args") != args:
            diff = _args_diff(args, state.get("args") if state else None)
            raise ShardsError(
                f"{out} holds an unfinished run with other arguments ({diff}); {hint}"
            )
        return None
    if any(p.name.startswith("shard-") for p in ours):
        raise ShardsError(f"{out} holds shards without a manifest or run state; {hint}")
    return None


def _args_diff(args: dict[str, Any], theirs: Any) -> str:
    if not isinstance(theirs, dict):
        return "its run state is unreadable"
    return ", ".join(
        f"{k}={args[k]!r} here, {theirs.get(k)!r} there" for k in args if args[k] != theirs.get(k)
    )


def _is_finished(out: Path, manifest: dict[str, Any], inputs: int) -> bool:
    """Cheap check that a finished folder still matches its manifest (no hashing)."""
    if manifest.get("inputs") != inputs:
        return False
    try:
        return all(
            (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
            for s in manifest["shards"]
        )
    except (KeyError, TypeError):
        return False


def write_shards(
    source: str | Path,
    out: str | Path,
    *,
    shard_size: int = 1000,
    shard_bytes: int | None = None,
    max_side: int | None = None,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
) -> ShardSummary:
    """Write `source` into shards under `out` (see the module docstring); resumable, idempotent."""
    if shard_size < 1:
        raise ShardsError(f"shard_size must be >= 1, got {shard_size}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ShardsError(f"shard_bytes must be >= 1, got {shard_bytes}")
    if max_side is not None and max_side < 1:
        raise ShardsError(f"max_side must be >= 1, got {max_side}")
    # webdataset imports torch (~1-2 s): paid here, before the clock starts, not in verify.
    import webdataset  # noqa: F401

    started = time.perf_counter()
    out = Path(out)
    src = read_source(source)
    args = {
        "source": str(Path(source).resolve()),
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "max_side": max_side,
        "seed": seed,
    }
    finished = _check_output(out, args, force)
    if finished is not None:
        if _is_finished(out, finished, len(src.items)):
            return ShardSummary(
                written=int(finished["total_samples"]),
                rejected=int(finished["rejected"]),
                shards=len(finished["shards"]),
                bytes=int(finished["total_bytes"]),
                seconds=time.perf_counter() - started,
                inputs=int(finished["inputs"]),
                up_to_date=True,
            )
        _log(progress, f"{out}: source or shards changed since the manifest was written; redoing")
        # From here on the folder is an unfinished run: the old manifest must not vouch for it.
        (out / MANIFEST_NAME).unlink()
    out.mkdir(parents=True, exist_ok=True)

    # The shuffled order is drawn over all inputs, so it depends only on the listing and seed.
    order = np.random.default_rng(seed).permutation(len(src.items))
    items = [src.items[i] for i in order]
    with _mapper(workers) as imap:
        bar = _Progress("check", len(items), progress)
        scans = []
        tasks = ((item.file, max_side, shard_bytes is not None) for item in items)
        for scan in imap(_scan, tasks, chunksize=8):
            scans.append(scan)
            bar.update()
        bar.close()

        samples = []
        for item, scan in zip(items, scans, strict=True):
            if scan.reason is None:
                key = f"{len(samples):09d}"
                sample = _Sample(
                    item.file,
                    key,
                    scan.ext,
                    item.label,
                    _meta(item, scan),
                    scan.reencode,
                    scan.size,
                )
                samples.append(sample)
        plan = _split(samples, shard_size, shard_bytes)
        fingerprint = _fingerprint(args, src.classes, plan)

        state_path = out / RUN_STATE_NAME
        state = _read_json(state_path)
        if state is not None and state.get("plan") != fingerprint:
            _log(progress, f"{out}: inputs changed since the interrupted run; starting over")
            for p in _our_files(out):
                p.unlink()
        write_atomic(state_path, json.dumps({"args": args, "plan": fingerprint}).encode())

        infos = _keep_complete_shards(out, plan)
        reused = len(infos)
        if reused:
            _log(progress, f"{out}: keeping {reused} complete shards of {len(plan)}")

        bar = _Progress(
            "write", sum(len(s) for i, s in enumerate(plan) if i not in infos), progress
        )
        for index, shard in enumerate(plan):
            if index in infos:
                continue
            images = _counted(_shard_images(shard, max_side, imap), bar)
            infos[index] = _write_shard(out, index, shard, images)
        bar.close()

    shards = [infos[i] for i in range(len(plan))]
    # rejected.txt lists inputs in source order (sorted), not in the shuffled order.
    reasons = {item.file: scan.reason for item, scan in zip(items, scans, strict=True)}
    rejected = [(item.rel, reasons[item.file]) for item in src.items if reasons[item.file]]
    write_atomic(
        out / REJECTED_NAME, "".join(f"{rel}\t{reason}\n" for rel, reason in rejected).encode()
    )
    total_bytes = sum(s.bytes for s in shards)
    manifest = {
        "version": MANIFEST_VERSION,
        "shards": [asdict(s) for s in shards],
        "total_samples": len(samples),
        "total_bytes": total_bytes,
        "classes": list(src.classes) if src.classes is not None else None,
        "inputs": len(items),
        "rejected": len(rejected),
        "args": args,
    }
    # Written last: its presence is what says the folder is finished.
    write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return ShardSummary(
        written=len(samples),
        rejected=len(rejected),
        shards=len(shards),
        bytes=total_bytes,
        seconds=time.perf_counter() - started,
        inputs=len(items),
        reused=reused,
    )


def _keep_complete_shards(out: Path, plan: list[list[_Sample]]) -> dict[int, ShardInfo]:
    """Clear an interrupted run's leftovers; keep (and describe) its complete, matching shards."""
    for p in out.glob("*.tmp"):
        p.unlink()
    for p in out.glob("shard-*.tar*"):
        index = p.name[len("shard-") :].split(".")[0]
        if not index.isdigit() or int(index) >= len(plan):
            p.unlink()
    infos: dict[int, ShardInfo] = {}
    for index, shard in enumerate(plan):
        path = out / _shard_name(index)
        sidecar = path.with_name(path.name + ".sha256")
        if _shard_is_complete(out, index, shard):
            sha = _read_sidecar(sidecar)
            assert sha is not None
            infos[index] = ShardInfo(path.name, len(shard), path.stat().st_size, sha)
        else:
            path.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
    return infos


def _shard_images(
    shard: list[_Sample], max_side: int | None, imap: Callable[..., Iterator[bytes]]
) -> Iterator[bytes]:
    """The stored bytes of a shard's samples, in order; only re-encoding goes to the workers."""
    # Source bytes are read here: shipping them back from a worker costs more than the read.
    tasks = ((s.file, max_side, True) for s in shard if s.reencode)
    reencoded = imap(_encode, tasks, chunksize=4)
    for s in shard:
        yield next(reencoded) if s.reencode else _encode((s.file, max_side, False))


def _counted(images: Iterable[bytes], bar: _Progress) -> Iterator[bytes]:
    for image in images:
        yield image
        bar.update()


# --------------------------------------------------------------------------------------------
# Reading back


def load_manifest(source: str | Path) -> Manifest:
    """Load a shard folder's manifest (the folder, or the manifest file itself)."""
    path = Path(source)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardsError(f"{path}: not a readable JSON manifest ({e})") from e

    def bad(what: str) -> ShardsError:
        return ShardsError(f"{path}: invalid manifest: {what}")

    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise bad(f"expected an object with version {MANIFEST_VERSION}")
    raw_shards = data.get("shards")
    if not isinstance(raw_shards, list):
        raise bad("'shards' must be a list")
    shards = []
    for i, s in enumerate(raw_shards):
        if not isinstance(s, dict):
            raise bad(f"shards[{i}] must be an object")
        name, samples, size, sha = s.get("name"), s.get("samples"), s.get("bytes"), s.get("sha256")
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise bad(f"shards[{i}].name must be a plain file name, got {name!r}")
        for field_name, value in (("samples", samples), ("bytes", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(f"shards[{i}].{field_name} must be a non-negative integer")
        if not isinstance(sha, str) or len(sha) != 64:
            raise bad(f"shards[{i}].sha256 must be a 64-digit hex string")
        shards.append(ShardInfo(name, samples, size, sha))
    classes = data.get("classes")
    if classes is not None and not (
        isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    ):
        raise bad("'classes' must be a list of names or null")
    total = data.get("total_samples")
    if total != sum(s.samples for s in shards):
        raise bad(f"total_samples {total!r} differs from the sum over shards")
    return Manifest(
        root=path.parent.absolute(),
        shards=tuple(shards),
        classes=tuple(classes) if classes is not None else None,
        total_samples=total,
    )


def _check_tar(path: Path) -> tuple[int, list[str]]:
    """Count the samples of one shard and decode every image; return (samples, problems)."""
    problems: list[str] = []
    samples: dict[str, set[str]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    problems.append(f"{path.name}: unexpected tar entry {member.name!r}")
                    continue
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, set()).add(ext)
                data = tar.extractfile(member)
                assert data is not None
                payload = data.read()
                if ext in IMAGE_EXTS:
                    try:
                        with _strict_decoding(), Image.open(io.BytesIO(payload)) as im:
                            im.load()
                    except Exception as e:  # any decoder failure is a problem to report
                        problems.append(f"{path.name}: {member.name} does not decode ({e})")
                elif ext == "json":
                    try:
                        meta = json.loads(payload)
                        if not {"width", "height", "path"} <= meta.keys():
                            raise KeyError("width, height, path")
                    except (ValueError, KeyError, TypeError, AttributeError):
                        problems.append(f"{path.name}: {member.name} is not valid sample json")
    except (OSError, tarfile.TarError) as e:
        problems.append(f"{path.name}: unreadable tar ({e})")
        return len(samples), problems
    for key, exts in samples.items():
        if len(exts & set(IMAGE_EXTS)) != 1 or "json" not in exts:
            problems.append(f"{path.name}: sample {key} has members {sorted(exts)}")
    return len(samples), problems


def verify_shards(out: str | Path) -> list[str]:
    """Re-check every shard against the manifest; the problems found (empty: all good)."""
    try:
        manifest = load_manifest(out)
    except (FileNotFoundError, ShardsError) as e:
        return [str(e)]
    problems: list[str] = []
    for shard in manifest.shards:
        path = Path(manifest.path(shard))
        if not path.is_file():
            problems.append(f"{shard.name}: missing")
            continue
        size = path.stat().st_size
        if size != shard.bytes:
            problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}")
        if file_digest(path)[1] != shard.sha256:
            problems.append(f"{shard.name}: sha256 differs from the manifest")
        count, found = _check_tar(path)
        problems += found
        if count != shard.samples:
            problems.append(f"{shard.name}: {count} samples, manifest says {shard.samples}")
    return problems

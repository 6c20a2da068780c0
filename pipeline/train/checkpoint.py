"""Sharded, atomic and complete checkpoints around DeepSpeed's engine (ARCHITECTURE decision 5).

A checkpoint is a tag directory `root/step-{step:08d}` holding
- DeepSpeed's own sharded files (`engine.save_checkpoint`, never with `save_latest`),
- one small file per rank, `rank-{rank:05d}.pt` (data position, RNG states: what DeepSpeed does not
  keep, or keeps from rank 0 only),
- `shared-{name}.pt` files written by rank 0 (full, shard-agnostic state such as the DINO teacher),
- `commit.json`, written last by rank 0 after every rank has finished: world size, ZeRO stage, step,
  recipe hash, and every file of the tag with its size and SHA-256. Each rank hashes its files while
  writing them (ours through `HashingWriter`; DeepSpeed's through a wrapper around its checkpoint
  engine), so committing costs no second read; rank 0 collects the digests.
Only then does rank 0 move our pointer `root/committed`. DeepSpeed's `latest` is not a commit marker
(it is written without a temporary name, before DeepSpeed's final barrier), so we never write it and
never read it. Every file of ours goes through a temporary name in the same directory and
`os.replace`; a crash at any point of `save` leaves `latest()` on the previous complete checkpoint.

Reading trusts nothing: `latest()` checks every file's content against its digest (or its size
only, with `verify="size"`, for runs too large to re-read at each resume) and falls back to the
previous complete checkpoint, naming the file that differs. No file is unpickled beyond tensors,
plain values and DeepSpeed's own record types (`safe_load`): our states are stored in that form,
DeepSpeed's loads go through the restricted unpickler, and before DeepSpeed's own loaders run
every file of the tag is checked by it.

Loading at another data-parallel world size (what DeepSpeed 0.19.8 does, checked on CPU/gloo):
- ZeRO-1/2 with optimizer state: DeepSpeed refuses the sharded optimizer files, so the tag is
  converted once to DeepSpeed's universal format (`ds_to_universal`, into `tag/universal`) and
  loaded with universal loading switched on for that call; fp32 weights and Adam moments come back
  exactly, repartitioned.
- ZeRO-1/2 weights only (`load_optimizer=False`): DeepSpeed's own path (full module copy in
  `mp_rank_00_model_states.pt`; fp32 master weights refreshed from it, so rounded under bf16/fp16).
- ZeRO-3 weights only: DeepSpeed consolidates the fp32 shards (`zero_to_fp32`), but it finds the
  tag through `latest` whatever tag it is given; we hand it a throw-away directory whose `latest`
  and links point at our tag (also used at the same world size).
- ZeRO-3 with optimizer state: refused with a `CheckpointError` (DeepSpeed's universal path loses
  per-group hyper-parameters and frozen parameters under ZeRO-3).

This module deliberately does not decide what goes into the states (the engine does), nor how a
resumed run re-splits per-rank data positions across a new world size (the loader does, from the
list of all saved ranks' states that `load` returns).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.fileio import HASH, HashingWriter, atomic_file, file_digest, write_atomic
from pipeline.train import safe_load

log = logging.getLogger(__name__)

COMMIT_FILE = "commit.json"
POINTER_FILE = "committed"
FORMAT_VERSION = 2  # 2: files carry a content digest; 1 (sizes only) still loads
VERIFY_MODES = ("content", "size")
_TAG_RE = re.compile(r"^step-(\d{8})$")
_SHARED_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_UNIVERSAL_DIR = "universal"  # DeepSpeed universal copy of a tag, made on a world-size change
_FROZEN_FRAGMENTS = "frozen_param_fragments"  # ZeRO-3: each rank's slice of frozen parameters


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or loaded as asked."""


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Python `random`, numpy's global and torch's CPU generators (and the current CUDA device),
    as tensors and plain values only, so the restricted unpickler reads them back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, 625 ints, gauss or None)
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    # Only the current device: get_rng_state_all() would create a context on every visible GPU.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned; missing entries are left alone (`{}` is a no-op)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- atomic files


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk, where the filesystem allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, data)
    _fsync(path.parent)  # the rename itself reaches the disk before anyone relies on it


def _torch_save_atomic(obj: Any, path: Path) -> tuple[int, str]:
    """Save through a temporary name; returns (size, digest), computed while writing."""
    with atomic_file(path) as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
        writer.flush()  # the last bytes out before the fsync, which the hashing overlaps
    return writer.size, writer.hexdigest()


def _torch_load(path: Path) -> Any:
    return safe_load.load(path, deepspeed=True)


class RankStates(Sequence):
    """The per-rank states of a checkpoint (index = saved rank), each file read when first
    indexed: at the same world size a rank reads its own, not every rank's."""

    def __init__(self, tag_dir: Path, count: int) -> None:
        self.tag_dir, self.count = tag_dir, count
        self._loaded: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rank: int) -> Any:  # type: ignore[override]
        if not -self.count <= rank < self.count:
            raise IndexError(f"rank {rank} of {self.count} saved ranks")
        rank %= self.count
        if rank not in self._loaded:
            # Memory-mapped: a reader that needs a few numbers of every rank's state (a data
            # position re-laid out over another world size) does not read all of every file.
            path = self.tag_dir / f"rank-{rank:05d}.pt"
            self._loaded[rank] = safe_load.load(path, deepspeed=True, mmap=True)
        return self._loaded[rank]

    def field(self, key: str) -> Sequence:
        """One key of every rank's state, still read on demand."""
        return _Field(self, key)


class _Field(Sequence):
    def __init__(self, states: RankStates, key: str) -> None:
        self.states, self.key = states, key

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, rank: int) -> Any:  # type: ignore[override]
        return self.states[rank][self.key]


class _RecordingCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, changed in two ways: every file it saves is hashed while
    written (into `records`, absolute path -> (size, digest)), and every file it loads goes through
    the restricted unpickler. Everything else is the wrapped engine's."""

    def __init__(self, inner: Any, records: dict[str, tuple[int, str]]) -> None:
        self.inner = inner
        self.records = records
        # Set while DeepSpeed loads ZeRO-3 weights saved at another world size: its per-rank
        # frozen-parameter fragments are partitions of the old layout, which it would copy
        # into the new one; they are restored by `_restore_frozen` instead.
        self.drop_frozen = False

    def save(self, state_dict: Any, path: str) -> None:
        with open(path, "wb") as f:
            writer = HashingWriter(f)
            torch.save(
                state_dict,
                writer,
                _use_new_zipfile_serialization=self.inner.zipfile_serialization,
            )
            writer.flush()  # the last bytes out; their hashing overlaps the fsync
            # Flushed to disk by the rank that wrote it: another node's fsync cannot do that.
            os.fsync(f.fileno())
        self.records[os.path.abspath(path)] = (writer.size, writer.hexdigest())

    def load(self, path: str, map_location: Any = None) -> Any:
        state = safe_load.load(Path(path), deepspeed=True, map_location=map_location)
        if self.drop_frozen and isinstance(state, dict):
            state.pop(_FROZEN_FRAGMENTS, None)
        return state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _install_recording(engine: Any, records: dict[str, tuple[int, str]]) -> None:
    """Put `_RecordingCheckpointEngine` in front of a DeepSpeed engine's torch checkpoint engine
    (other engines, e.g. asynchronous ones, are left alone: their files are hashed at commit)."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, _RecordingCheckpointEngine):
        current.records = records
    elif type(current).__name__ == "TorchCheckpointEngine":
        engine.checkpoint_engine = _RecordingCheckpointEngine(current, records)


def _list_files(tag_dir: Path) -> Iterator[Path]:
    """Every file of a tag (recursive) except the commit file and hidden temporaries."""
    for dirpath, dirnames, filenames in os.walk(tag_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or (dirpath == str(tag_dir) and name == COMMIT_FILE):
                continue
            yield Path(dirpath, name)


# --------------------------------------------------------------------------- commit records


def read_commit(tag_dir: Path) -> dict:
    """The parsed `commit.json` of a tag; `CheckpointError` when absent or unreadable."""
    path = Path(tag_dir) / COMMIT_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{tag_dir} has no {COMMIT_FILE}: not a committed checkpoint") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable {path}: {e}") from e
    missing = {"tag", "step", "world_size", "zero_stage", "files"} - set(record)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}")
    return record


def _expected(entry: int | dict) -> tuple[int, str | None]:
    """(size, digest or None) of a commit record's file entry (format 1 listed sizes only)."""
    if isinstance(entry, int):
        return entry, None
    return int(entry["size"]), entry.get(HASH)


def validate(tag_dir: Path, verify: str = "size") -> str | None:
    """None when the tag is committed and complete, else what is wrong with it (naming the file).

    `verify="size"` compares file sizes with the commit record; `"content"` also re-reads every
    file and compares its digest (a bit flip or a half-copied file of the right size)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    tag_dir = Path(tag_dir)
    try:
        record = read_commit(tag_dir)
    except CheckpointError as e:
        return str(e)
    if record["tag"] != tag_dir.name:
        return f"{tag_dir / COMMIT_FILE} names tag {record['tag']!r}"
    entries = {rel: _expected(entry) for rel, entry in record["files"].items()}
    for rel, (size, _) in entries.items():  # cheap checks of every file before any long read
        path = tag_dir / rel
        try:
            actual = path.stat().st_size
        except OSError:
            return f"missing {path}"
        if actual != size:
            return f"{path} has {actual} bytes, {COMMIT_FILE} lists {size}"
    if verify == "content":
        for rel, (_, digest) in entries.items():
            if digest is None:
                continue  # written before digests were recorded
            if file_digest(tag_dir / rel)[1] != digest:
                return (
                    f"{tag_dir / rel} does not match its {HASH} in {COMMIT_FILE} (changed or "
                    f"damaged after the save)"
                )
    return None


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Writes, finds and loads committed checkpoints under `root` (see the module docstring).

    `save` and `load` are collective (every rank calls them); `latest` and `commit_info` read
    files only and work on any rank.
    """

    def __init__(
        self,
        root: Path,
        *,
        rank: int,
        world_size: int,
        keep: int = 3,
        recipe_hash: str = "",
        verify: str = "content",
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.recipe_hash = recipe_hash
        self.verify = verify
        self._written: dict[str, tuple[int, str]] = {}  # this rank's files of the current save

    # ----------------------------------------------------------------- names

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:08d}"

    def _tags(self) -> list[tuple[int, Path]]:
        """Tag directories under root, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _TAG_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def _pointer(self) -> str | None:
        try:
            return (self.root / POINTER_FILE).read_text().strip() or None
        except OSError:
            return None

    # ----------------------------------------------------------------- save

    def save(
        self,
        engine: Any,
        step: int,
        *,
        client_state: dict,
        rank_state: dict,
        shared: dict[str, dict] | None = None,
    ) -> Path:
        """Collective. Writes and commits tag `step-{step:08d}`; returns its directory.

        `client_state` must be the same on every rank (DeepSpeed keeps rank 0's under ZeRO-1/2);
        `rank_state` is this rank's own; `shared` (rank 0's copy is written) holds full,
        shard-agnostic state dicts. Re-saving an existing step replaces that tag.
        """
        shared = shared or {}
        for name in shared:
            if not _SHARED_RE.match(name):
                raise ValueError(f"shared entry name {name!r} is not a plain file-name part")
        tag = self.tag(step)
        tag_dir = self.root / tag

        # A leftover directory of this tag (a crashed attempt at the same step, or a re-save)
        # is removed first, so no stale shard of another world size ends up in the commit.
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tag_dir.exists():
                    self._remove(tag_dir)
            except OSError as e:
                error = e
        self._agree(error, engine, f"preparing {tag_dir}")

        # 1. DeepSpeed's sharded files (its collectives inside), hashed as they are written.
        self._written = {}
        _install_recording(engine, self._written)
        engine.save_checkpoint(
            str(self.root), tag=tag, client_state=client_state, save_latest=False
        )

        # 2-3. Our files: per-rank state on every rank, shared state on rank 0.
        try:
            path = tag_dir / f"rank-{self.rank:05d}.pt"
            self._written[str(path.resolve())] = _torch_save_atomic(rank_state, path)
            if self.rank == 0:
                for name, state in shared.items():
                    path = tag_dir / f"shared-{name}.pt"
                    self._written[str(path.resolve())] = _torch_save_atomic(state, path)
        except Exception as e:
            error = e
        # 4. Every rank has finished writing (or all raise together instead of hanging).
        self._agree(error, engine, f"writing {tag_dir}")
        digests = self._gather_digests(tag_dir)

        # 4-6. Commit record, pointer, pruning: rank 0 only.
        if self.rank == 0:
            try:
                self._write_commit(engine, tag_dir, step, client_state, shared, digests)
                self._move_pointer(tag)
            except Exception as e:
                error = e
            else:
                try:
                    self._prune(step)
                except OSError as e:  # a failed clean-up must not fail a committed save
                    log.warning("pruning old checkpoints under %s failed: %s", self.root, e)
        # 7. Nobody goes on before the commit is visible (or everybody learns it failed).
        self._agree(error, engine, f"committing {tag_dir}")
        return tag_dir

    def _gather_digests(self, tag_dir: Path) -> dict[str, tuple[int, str]]:
        """Collective: every rank's (size, digest) of the files it wrote into `tag_dir`, by path
        relative to it (rank 0 uses them; the others get them too, at no extra cost)."""
        mine = {}
        for path, entry in self._written.items():
            rel = (
                Path(path).relative_to(tag_dir.resolve())
                if path.startswith(str(tag_dir.resolve()))
                else None
            )
            if rel is not None:
                mine[rel.as_posix()] = entry
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            every: list[Any] = [None] * self.world_size
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        merged: dict[str, tuple[int, str]] = {}
        for part in every:
            merged.update(part)
        return merged

    def _write_commit(
        self,
        engine: Any,
        tag_dir: Path,
        step: int,
        client_state: dict,
        shared: dict,
        digests: dict[str, tuple[int, str]],
    ) -> None:
        files = {}
        for path in _list_files(tag_dir):
            rel = path.relative_to(tag_dir).as_posix()
            size = path.stat().st_size
            recorded = digests.get(rel)
            if recorded is None or recorded[0] != size:
                # Written past the recording wrappers (another DeepSpeed checkpoint engine, a
                # helper script it copies), so neither hashed nor fsynced yet: do both now.
                log.debug("hashing %s at commit (not recorded while written)", path)
                _fsync(path)
                recorded = file_digest(path)
            files[rel] = {"size": size, HASH: recorded[1]}
        for rank in range(self.world_size):  # cheap guard against a rank that wrote elsewhere
            if f"rank-{rank:05d}.pt" not in files:
                raise CheckpointError(f"{tag_dir} lacks the file of rank {rank}")
        now = time.time()
        record = {
            "format": FORMAT_VERSION,
            "tag": tag_dir.name,
            "step": step,
            "world_size": self.world_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "recipe_hash": self.recipe_hash,
            "client_keys": sorted(client_state),
            # Plain figures of the client state (step, samples, global batch, ...), readable by
            # a launcher without loading anything.
            "progress": {
                k: v for k, v in client_state.items() if isinstance(v, (bool, int, float, str))
            },
            "shared": sorted(shared),
            "created": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "created_unix": now,
            "files": files,
        }
        _write_bytes_atomic(tag_dir / COMMIT_FILE, (json.dumps(record, indent=1) + "\n").encode())

    def _move_pointer(self, tag: str) -> None:
        _write_bytes_atomic(self.root / POINTER_FILE, (tag + "\n").encode())

    def _prune(self, current_step: int) -> None:
        """Keep the newest `keep` complete tags up to the current one; drop older ones and older
        incomplete ones. Tags newer than the current one are never touched: one may be being
        written (or belong to a run we deliberately resumed before)."""
        older = [(s, d) for s, d in self._tags() if s < current_step]
        complete = [d for _, d in older if validate(d, "size") is None]
        kept = set(complete[max(len(complete) - (self.keep - 1), 0) :]) if self.keep > 1 else set()
        for _, tag_dir in older:
            if tag_dir not in kept:
                self._remove(tag_dir)
        for entry in self.root.iterdir():  # leftovers of interrupted deletions and loads
            if entry.name.startswith((".deleting-", ".ds-load-")) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def _remove(self, tag_dir: Path) -> None:
        # Renamed first, so a half-deleted directory never looks like a tag.
        trash = tag_dir.with_name(f".deleting-{tag_dir.name}-{os.getpid()}")
        os.replace(tag_dir, trash)
        shutil.rmtree(trash)

    # ----------------------------------------------------------------- find

    def latest(self) -> Path | None:
        """The newest committed, complete tag: the one `committed` names if it validates, else the
        newest valid tag older than it (any valid tag when there is no pointer). Tags are checked
        as `self.verify` says (content digests by default). No collectives: call it on one rank
        and broadcast the answer, so that every rank resumes from the same tag."""
        pointer = self._pointer()
        tags = self._tags()
        limit = None
        if pointer is not None:
            match = _TAG_RE.match(pointer)
            if match:
                limit = int(match.group(1))
                problem = validate(self.root / pointer, self.verify)
                if problem is None:
                    return self.root / pointer
                log.warning(
                    "checkpoint pointer names %s, which is not usable: %s", pointer, problem
                )
            else:
                log.warning("ignoring malformed checkpoint pointer %r", pointer)
        for step, tag_dir in reversed(tags):
            if limit is not None and step >= limit:
                continue
            problem = validate(tag_dir, self.verify)
            if problem is None:
                return tag_dir
            log.warning("skipping checkpoint %s: %s", tag_dir, problem)
        return None

    def commit_info(self, tag_dir: Path) -> dict:
        """The validated commit record of a tag (world size, ZeRO stage, step, ...). No collectives:
        a launcher can read the saved world size before it builds the engine."""
        problem = validate(tag_dir)
        if problem is not None:
            raise CheckpointError(f"{tag_dir} is not a complete checkpoint: {problem}")
        return read_commit(tag_dir)

    # ----------------------------------------------------------------- load

    def load(
        self, engine: Any, tag_dir: Path, *, load_optimizer: bool = True
    ) -> tuple[dict, list[dict], dict[str, dict]]:
        """Collective. Loads a committed tag into `engine`.

        Returns (client_state, rank_states of all saved ranks, index = saved rank, shared dicts);
        a rank's state is read when first indexed, so a rank that needs only its own reads one.
        At another world size, ZeRO-1/2 go through DeepSpeed's universal format and ZeRO-3 loads
        weights only (`load_optimizer=False`); ZeRO-3 with optimizer state raises CheckpointError.
        """
        tag_dir = Path(tag_dir)
        record = self.commit_info(tag_dir)
        saved_ws, saved_stage = record["world_size"], record["zero_stage"]
        stage = int(engine.zero_optimization_stage())
        where = (
            f"{tag_dir} (saved at world size {saved_ws}, ZeRO-{saved_stage}; "
            f"now world size {self.world_size}, ZeRO-{stage})"
        )
        if (saved_stage == 3) != (stage == 3):
            raise CheckpointError(f"cannot load across ZeRO-3 and ZeRO-1/2 layouts: {where}")
        saved_hash = record.get("recipe_hash", "")
        if saved_hash and self.recipe_hash and saved_hash != self.recipe_hash:
            # Legitimate (a longer schedule, a new log interval), but worth a line in the log.
            log.warning("resuming %s written by another recipe (hash %s, now %s)",
                        tag_dir, saved_hash, self.recipe_hash)  # fmt: skip
        # Some of DeepSpeed's loaders unpickle without restriction: check every file first.
        self._check_safe(tag_dir, engine)
        universal_engine = bool(engine.load_universal_checkpoint())
        if stage == 3 and universal_engine:
            raise CheckpointError(
                f"universal loading under ZeRO-3 drops frozen parameters and per-group "
                f"hyper-parameters; build the engine without "
                f"checkpoint.load_universal: {where}"
            )

        if stage == 3 and load_optimizer and saved_ws != self.world_size:
            raise CheckpointError(
                f"ZeRO-3 optimizer state cannot be resharded to another world size (DeepSpeed "
                f"refuses it; its universal path loses param groups and frozen parameters). Load "
                f"with load_optimizer=False (weights only, fresh optimizer) or resume at world "
                f"size {saved_ws}: {where}"
            )
        if stage == 3 and not load_optimizer:
            ds_client = self._load_zero3_weights(engine, tag_dir, saved_ws)
        elif universal_engine or (load_optimizer and saved_ws != self.world_size):
            ds_client = self._load_universal(engine, tag_dir)
        else:
            _, ds_client = engine.load_checkpoint(
                str(self.root),
                tag=tag_dir.name,
                load_optimizer_states=load_optimizer,
                load_lr_scheduler_states=False,
            )
            if ds_client is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint files in {where}")

        client_state = self._client_state(ds_client or {}, record, tag_dir)
        rank_states = RankStates(tag_dir, saved_ws)
        shared = {name: _torch_load(tag_dir / f"shared-{name}.pt") for name in record["shared"]}
        return client_state, rank_states, shared

    def _client_state(self, ds_client: dict, record: dict, tag_dir: Path) -> dict:
        """Our keys only (DeepSpeed returns its own bookkeeping alongside)."""
        keys = record.get("client_keys", [])
        if all(k in ds_client for k in keys):
            return {k: ds_client[k] for k in keys}
        # The universal copy may not carry the client keys: read them from the original files.
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            if (tag_dir / name).is_file():
                saved = _torch_load(tag_dir / name)
                return {k: saved[k] for k in keys}
        raise CheckpointError(f"no DeepSpeed model-state file with the client state in {tag_dir}")

    def _load_universal(self, engine: Any, tag_dir: Path) -> dict:
        """ZeRO-1/2 at another world size: convert once to `tag/universal`, load it universally."""
        out = tag_dir / _UNIVERSAL_DIR
        error: BaseException | None = None
        if self.rank == 0 and not out.is_dir():
            try:
                _convert_to_universal(tag_dir, out)
            except Exception as e:
                error = e
        self._agree(error, engine, f"converting {tag_dir} to DeepSpeed's universal format")
        self._check_safe(out, engine)  # made by us from checked files, unless planted there
        # Universal loading is a DeepSpeed config switch read only inside load_checkpoint;
        # switch it on for this call rather than asking for another engine.
        config = engine._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            _, ds_client = engine.load_checkpoint(
                str(tag_dir),
                tag=_UNIVERSAL_DIR,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        finally:
            config.load_universal_checkpoint = before
        if ds_client is None:
            raise CheckpointError(f"DeepSpeed found no universal checkpoint in {out}")
        return ds_client

    def _load_zero3_weights(self, engine: Any, tag_dir: Path, saved_ws: int) -> dict:
        """ZeRO-3 weights only. DeepSpeed consolidates the fp32 shards through `latest` of the
        directory it is given, whatever tag it is passed, so it gets a throw-away directory
        whose `latest` and links point at our tag. Ranks beyond the saved world size read rank
        0's model-state file (only its client state and metadata are used on this path)."""
        alias = self.root / f".ds-load-{tag_dir.name}"
        error: BaseException | None = None
        if self.rank == 0:
            try:
                _make_alias(alias, tag_dir, saved_ws, self.world_size)
            except Exception as e:
                error = e
        self._agree(error, engine, f"preparing the ZeRO-3 weight load of {tag_dir}")
        ds_client = None
        _install_recording(engine, self._written)
        recorder = engine.checkpoint_engine
        resharding = saved_ws != self.world_size
        try:
            recorder.drop_frozen = resharding
            _, ds_client = engine.load_checkpoint(
                str(alias),
                tag=tag_dir.name,
                load_optimizer_states=False,
                load_lr_scheduler_states=False,
            )
            if resharding:
                _restore_frozen(engine, tag_dir, saved_ws, self.rank)
        except Exception as e:
            error = e
        finally:
            recorder.drop_frozen = False
        try:
            self._agree(error, engine, f"loading the weights of {tag_dir}")
        finally:  # every rank has finished reading through the links
            if self.rank == 0:
                shutil.rmtree(alias, ignore_errors=True)
        if ds_client is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {tag_dir}")
        return ds_client

    def _check_safe(self, directory: Path, engine: Any) -> None:
        """Collective: rank 0 checks every pickled file below `directory` with the restricted
        unpickler (pickles only, not tensor data); all ranks raise together if one is refused."""
        error: BaseException | None = None
        if self.rank == 0:
            try:
                safe_load.check_tree(directory)
            except safe_load.UnsafeCheckpointError as e:
                error = e
        self._agree(error, engine, f"checking the files of {directory}")

    # ----------------------------------------------------------------- collectives

    def _agree(self, error: BaseException | None, engine: Any, what: str) -> None:
        """A barrier that also tells every rank whether any rank failed, so that all raise
        together instead of the healthy ones waiting forever in the next collective."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            device = torch.device(getattr(engine, "device", "cpu"))
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            failed = bool(flag.item())
        else:
            failed = error is not None
        if error is not None:
            raise CheckpointError(f"rank {self.rank} failed {what}: {error}") from error
        if failed:
            raise CheckpointError(f"another rank failed {what}")


def _restore_frozen(engine: Any, tag_dir: Path, saved_ws: int, rank: int) -> None:
    """ZeRO-3 at a new world size: put this rank's slice of every frozen parameter in place.

    Each saved rank kept its slice of the flattened (padded) tensor; joined in rank order they
    give the whole tensor, which is cut again for the new layout (slice `rank` of
    `ds_tensor.numel()` values, zero padding past the end)."""
    frozen = [
        p for p in engine.module.parameters() if not p.requires_grad and hasattr(p, "ds_tensor")
    ]
    if not frozen:
        return
    pieces: dict[str, list[torch.Tensor]] = {}
    for r in range(saved_ws):
        state = _torch_load(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        for name, fragment in (state.get(_FROZEN_FRAGMENTS) or {}).items():
            pieces.setdefault(name, []).append(fragment.reshape(-1))
    for param in frozen:
        name = engine.param_names[param]
        if name not in pieces:
            raise CheckpointError(f"{tag_dir} holds no saved slices of the frozen {name}")
        whole = torch.cat(pieces[name])[: param.ds_numel]
        size = param.ds_tensor.numel()
        part = torch.zeros(size, dtype=param.ds_tensor.dtype)
        piece = whole[rank * size : (rank + 1) * size]
        part[: piece.numel()] = piece
        param.ds_tensor.data.copy_(part.to(param.ds_tensor.device))


def _make_alias(alias: Path, tag_dir: Path, saved_ws: int, world_size: int) -> None:
    tmp = alias.with_name(f"{alias.name}.tmp-{os.getpid()}")
    for stale in (alias, tmp):
        if stale.exists():
            shutil.rmtree(stale)
    inner = tmp / tag_dir.name
    inner.mkdir(parents=True)
    for path in tag_dir.iterdir():
        if path.is_file():
            (inner / path.name).symlink_to(path.resolve())
    rank0 = (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").resolve()
    for rank in range(saved_ws, world_size):
        (inner / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").symlink_to(rank0)
    (tmp / "latest").write_text(tag_dir.name)
    os.replace(tmp, alias)


def _convert_to_universal(tag_dir: Path, out: Path) -> None:
    """`ds_to_universal` in a child process (it runs worker pools), into a temporary directory
    renamed into place when complete."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(tag_dir), "--output_folder", str(tmp),
        "--inject_missing_state",  # our checkpoints carry no Megatron universal-checkpoint info
        "--num_extract_workers", "2", "--num_merge_workers", "2",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (done.stdout + done.stderr)[-3000:]
        raise CheckpointError(
            f"ds_to_universal failed on {tag_dir} (rc {done.returncode}):\n{tail}"
        )
    os.replace(tmp, out)

"""Small file helpers every layer may use (this module imports nothing of ours)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import BinaryIO

HASH = "sha256"  # hashlib's OpenSSL build runs it at about 2 GB/s per core with SHA extensions
_CHUNK = 8 << 20


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary name in the same folder, fsynced and
    renamed onto `path` when the block ends without an error (removed when it raises). Readers
    see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


class HashingWriter(io.RawIOBase):
    """A write-only binary stream that hashes what passes through it on the way to `raw`.

    The digest of a file is computed from the bytes as they are written, so recording it costs
    no second read. Small writes (a serialiser's headers and records) are gathered into one
    buffer of up to `buffer_bytes`, and each full block is hashed on a thread of its own while
    it is written (hashlib and file writes both release the GIL): the file gets a few large
    writes instead of many small ones, and the hashing overlaps the writing and, when the caller
    fsyncs before asking for `hexdigest()`, the fsync too. Only sequential writes are allowed
    (`torch.save` writes both of its formats sequentially): a seek would make the digest wrong,
    so the stream is not seekable. `flush()` writes out what is buffered.
    """

    def __init__(self, raw: BinaryIO, buffer_bytes: int = 64 << 20) -> None:
        super().__init__()
        self.raw = raw
        self.digest = hashlib.new(HASH)
        self.size = 0
        self.buffer_bytes = buffer_bytes
        self._buffer = bytearray()
        self._hashing: Future | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        n = len(view)
        if len(self._buffer) + n > self.buffer_bytes:
            self._drain()
        if n >= self.buffer_bytes:  # a large block goes through directly
            self._emit(view, owned=False)
        else:
            self._buffer += view
        self.size += n
        return n

    def _emit(self, block: memoryview | bytearray, owned: bool) -> None:
        """Hash `block` on the hashing thread while writing it. A block the caller may reuse
        (`owned` False) is waited for before returning."""
        self._wait()  # blocks are hashed in the order written
        self._hashing = _hasher().submit(self.digest.update, block)
        written = self.raw.write(block)
        if written is not None and written != len(block):
            raise OSError(f"short write ({written} of {len(block)} bytes)")
        if not owned:
            self._wait()

    def _wait(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def _drain(self) -> None:
        if self._buffer:
            block, self._buffer = self._buffer, bytearray()  # the thread owns the old one
            self._emit(block, owned=True)

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self._drain()
        if not self.raw.closed:  # also called when the stream is collected after `raw` closed
            self.raw.flush()

    def close(self) -> None:
        if not self.closed:
            self.flush()
        super().close()

    def hexdigest(self) -> str:
        """The digest of everything written so far (written out first, hashing finished)."""
        self.flush()
        self._wait()
        return self.digest.hexdigest()


@cache
def _hasher() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")


def file_digest(path: Path) -> tuple[int, str]:
    """(size, hex digest) of a file, read in chunks."""
    digest = hashlib.new(HASH)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()

"""Small file helpers every layer may use (this module imports nothing of ours)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
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

    The digest of a file is computed while it is written, so recording it costs no second read.
    Only sequential writes are allowed (`torch.save` writes both of its formats sequentially):
    a seek elsewhere would make the digest wrong, so it raises instead.
    """

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self.raw = raw
        self.digest = hashlib.new(HASH)
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self.digest.update(view)
        written = self.raw.write(view)
        if written is not None and written != len(view):
            raise OSError(f"short write ({written} of {len(view)} bytes)")
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self.raw.flush()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def file_digest(path: Path) -> tuple[int, str]:
    """(size, hex digest) of a file, read in chunks."""
    digest = hashlib.new(HASH)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()

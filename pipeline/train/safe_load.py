"""Reading checkpoint files without running what they hold.

`torch.load(weights_only=False)` executes any callable a pickle names, so a checkpoint copied from
a colleague, a shared file system or the internet could run code on load. Everything here reads
with torch's restricted unpickler (`weights_only=True`), which rebuilds tensors, containers and
plain values only, plus the few DeepSpeed types that DeepSpeed's own checkpoint files hold (all
plain records: a fragment address, a loss-scaler's settings, a ZeRO-stage enum). A file that names
anything else is refused with `UnsafeCheckpointError`, naming the file and the type, before a
single object of it is built.

Some of DeepSpeed's own loaders (universal conversion, ZeRO consolidation) call
`torch.load(weights_only=False)` themselves; `check_files` is the gate in front of them: it runs
the restricted unpickler over every file they will read (memory-mapped, so tensor data is not
read), and only files that pass reach them.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import torch

# Files that are not pickles are never unpickled by anyone: nothing to check.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs a type outside the allowed set to load."""


@cache
def deepspeed_globals() -> tuple[Callable, ...]:
    """The types DeepSpeed 0.14-0.19 writes into its checkpoint files: plain records only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum)


@cache
def numpy_array_globals() -> tuple[Callable, ...]:
    """What a pickled numpy array needs (accelerate keeps numpy's RNG state that way): the array
    type, its dtype and numpy's array rebuilder, which rebuilds plain data only."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed the package
    reconstruct = core.multiarray._reconstruct
    return (np.ndarray, np.dtype, reconstruct, type(np.dtype(np.uint32)))


def _refusal(path: Path, error: Exception) -> UnsafeCheckpointError:
    found = _GLOBAL_RE.findall(str(error))
    what = f"the type {found[0]}" if found else "an object the restricted loader refuses"
    return UnsafeCheckpointError(
        f"{path} needs {what} to load, which a checkpoint of this pipeline never holds; it was "
        f"not loaded (nothing from it ran). If you wrote this file yourself with other code, "
        f"convert it to tensors and plain values first."
    )


def load(
    path: Path,
    *,
    deepspeed: bool = False,
    numpy: bool = False,
    mmap: bool = False,
    map_location: Any = None,
) -> Any:
    """`torch.load` with the restricted unpickler (onto the CPU unless `map_location` says
    otherwise); `deepspeed=True` also allows DeepSpeed's record types, `numpy=True` numpy arrays.
    Raises `UnsafeCheckpointError` naming the file and the type."""
    path = Path(path)
    allowed = list(deepspeed_globals()) if deepspeed else []
    allowed += list(numpy_array_globals()) if numpy else []
    where = "cpu" if map_location is None else map_location
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=where, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # an old (non-zip) file: read it whole instead
            return load(path, deepspeed=deepspeed, numpy=numpy, map_location=map_location)
        raise


def check_files(paths: Iterable[Path], *, numpy: bool = False) -> None:
    """Refuse (`UnsafeCheckpointError`) the first pickled file among `paths` that names a type
    outside torch's and DeepSpeed's allowed ones (and numpy arrays', with `numpy=True`). Reads
    the pickles, not the tensor data."""
    for path in paths:
        path = Path(path)
        if path.suffix in PICKLE_SUFFIXES and path.is_file():
            load(path, deepspeed=True, numpy=numpy, mmap=True)


def check_tree(root: Path, *, numpy: bool = False) -> None:
    """`check_files` over every file below `root`."""
    check_files(sorted(p for p in Path(root).rglob("*") if p.is_file()), numpy=numpy)

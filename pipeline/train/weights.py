"""Full fp32 weights from a committed checkpoint or an export, and starting a run from them.

Reading a checkpoint (no process group needed; one process on CPU, e.g. on a login node):
- teacher (DINO): `shared-teacher.pt`, the full fp32 teacher state dict the engine writes in every
  ZeRO stage;
- student: the fp32 weights consolidated from DeepSpeed's files. ZeRO 0-2 under fp32: the module
  copy in `mp_rank_00_model_states.pt` (it *is* the master copy). ZeRO-3, or ZeRO-1/2 under
  bf16/fp16: the fp32 master partitions of the optimizer files (the module copy is empty under
  ZeRO-3 and rounded under bf16/fp16), through `deepspeed.utils.zero_to_fp32`; DeepSpeed's BF16
  optimizer (ZeRO-1 + bf16 + fp32 gradient accumulation) writes files that tool refuses, so those
  partitions are joined here from the optimizer's own name -> slice table.
Every tag is verified (digests, restricted unpickler) before anything of it is read.

Starting from weights (`model.init_from`): `method_weights` gives a method's state under
`student.` and `teacher.` prefixes from a checkpoint or an export (a backbone-only export fills
`student.backbone.` and, for DINO, the teacher copies the student), and `init_method` loads it
strictly: every missing or unexpected key is an error unless a `model.init_from_ignore` pattern
names it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from pipeline.config import Recipe, load_recipe
from pipeline.train import safe_load
from pipeline.train.checkpoint import (
    COMMIT_FILE,
    CheckpointError,
    CheckpointManager,
    read_commit,
    validate,
)

log = logging.getLogger(__name__)

_MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the full module copy
_BF16_OPTIM_RE = re.compile(r"^bf16_zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
STUDENT, TEACHER = "student.", "teacher."


class WeightsError(RuntimeError):
    """Weights cannot be read or applied as asked (the message names the path or the keys)."""


def resolve_checkpoint(source: Path, verify: str = "content") -> Path:
    """The committed tag directory that `source` means: a tag directory itself, or the newest
    committed tag under a run directory (`source/checkpoints`) or a checkpoints root. Our
    `committed` pointer decides, never DeepSpeed's `latest`.

    The tag's files are then checked against their digests (`verify="content"`, or sizes only)
    and with the restricted unpickler; a tag that fails either is refused naming the file (an
    export or an evaluation never falls back silently to an older tag)."""
    source = Path(source)
    if not source.exists():
        raise WeightsError(f"{source} does not exist")
    if (source / COMMIT_FILE).is_file() or source.name.startswith("step-"):
        tag = source
    else:
        root = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        # Sizes only to pick the tag (an interrupted save is skipped); content right below.
        found = CheckpointManager(root, rank=0, world_size=1, verify="size").latest()
        if found is None:
            raise WeightsError(
                f"no committed checkpoint under {root} (a run saves one every "
                f"checkpoint.every_steps steps; pass a run directory, its checkpoints/ folder or "
                f"a step-XXXXXXXX tag)"
            )
        tag = found
    problem = validate(tag, verify)
    if problem is not None:
        raise WeightsError(f"{tag} is not a complete, committed checkpoint: {problem}")
    try:
        safe_load.check_tree(tag)
    except safe_load.UnsafeCheckpointError as e:
        raise WeightsError(str(e)) from None
    return tag


def run_recipe(tag_dir: Path) -> Recipe:
    """The resolved recipe of the run a tag belongs to (`<run dir>/config.yaml`)."""
    path = Path(tag_dir).parent.parent / "config.yaml"
    if not path.is_file():
        raise WeightsError(
            f"{path} not found: export reads the run's resolved recipe to know the backbone of "
            f"{tag_dir} (tags live in <run dir>/checkpoints/)"
        )
    return load_recipe(path)


def _torch_load(path: Path) -> Any:
    # DeepSpeed's files hold a few record types of its own besides tensors (fragment addresses).
    return safe_load.load(path, deepspeed=True, mmap=True)


def teacher_state(tag_dir: Path, record: dict) -> dict[str, torch.Tensor]:
    """The full fp32 DINO teacher state dict of a tag (`shared-teacher.pt`)."""
    if "teacher" not in record.get("shared", []):
        raise WeightsError(
            f"{tag_dir} holds no teacher (its {COMMIT_FILE} lists shared state "
            f"{record.get('shared', [])}); only DINO runs have one: export the student"
        )
    return safe_load.load(tag_dir / "shared-teacher.pt")


def student_state(tag_dir: Path, record: dict) -> dict[str, torch.Tensor]:
    """The student's full fp32 state dict, consolidated from DeepSpeed's files (see above)."""
    stage = int(record["zero_stage"])
    if stage < 3:
        module = _torch_load(tag_dir / _MODEL_STATES)["module"]
        if all(t.dtype == torch.float32 for t in module.values() if t.is_floating_point()):
            return dict(module)  # fp32: the module copy is the master copy, whole
    bf16_files = sorted(
        (int(m.group(1)), p) for p in tag_dir.iterdir() if (m := _BF16_OPTIM_RE.match(p.name))
    )
    if stage < 3 and bf16_files:
        return _merge_bf16_partitions(tag_dir, [p for _, p in bf16_files], record)
    return _zero_to_fp32(tag_dir)


def _zero_to_fp32(tag_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of ZeRO-1/2/3 fp32 master partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Given a tag, it reads that directory directly (only tag=None makes it read `latest`).
    chatter = io.StringIO()  # it prints progress and a tqdm bar; keep them for the debug log
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (ValueError, FileNotFoundError) as e:
        raise WeightsError(
            f"DeepSpeed cannot consolidate the fp32 weights of {tag_dir}: {e}"
        ) from e
    log.debug("zero_to_fp32 on %s:\n%s", tag_dir, chatter.getvalue())
    return state


def _merge_bf16_partitions(
    tag_dir: Path, files: list[Path], record: dict
) -> dict[str, torch.Tensor]:
    """Join the fp32 master partitions of DeepSpeed's BF16 optimizer, one file per rank.

    Each rank's file holds, per parameter group, its flat fp32 partition and a table name ->
    (start, numel) of the parameter fragments inside it; a parameter split across ranks is the
    concatenation of its fragments in rank order. Frozen parameters and buffers are not in the
    optimizer: they come from the module copy (upcast, as `zero_to_fp32` does).
    """
    if len(files) != record["world_size"]:
        raise WeightsError(
            f"{tag_dir} has {len(files)} BF16 optimizer files for world size {record['world_size']}"
        )
    model = _torch_load(tag_dir / _MODEL_STATES)
    shapes = {name: shape for group in model["param_shapes"] for name, shape in group.items()}
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for path in files:  # rank order
        optim = _torch_load(path)["optimizer_state_dict"]
        flats, tables = optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]
        for flat, table in zip(flats, tables, strict=True):
            for name, address in table.items():
                pieces[name].append(flat.narrow(0, address.start, address.numel))
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        flat = torch.cat(pieces[name]) if pieces[name] else torch.empty(0)
        if flat.numel() != shape.numel():
            raise WeightsError(
                f"{tag_dir}: fp32 fragments of {name} hold {flat.numel()} values, not "
                f"{shape.numel()} (missing or mixed optimizer files?)"
            )
        state[name] = flat.view(shape)
    for name, tensor in model["module"].items():
        if name not in state:  # buffers and frozen parameters
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return state


# --------------------------------------------------------------------------- whole methods


def checkpoint_method_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole method of a verified tag: the student (backbone, heads, decoder, DINO centre)
    under `student.`, and DINO's teacher under `teacher.`; fp32."""
    record = read_commit(tag_dir)
    try:
        state = {STUDENT + k: v for k, v in student_state(tag_dir, record).items()}
        if "teacher" in record.get("shared", []):
            state.update({TEACHER + k: v for k, v in teacher_state(tag_dir, record).items()})
    except CheckpointError as e:
        raise WeightsError(str(e)) from e
    return state


def read_export_config(path: Path) -> dict[str, Any]:
    """The config of an exported `.safetensors` file: its `.json` beside it, else the copy in the
    file's metadata (read without loading any tensor)."""
    weights = Path(path).with_suffix(".safetensors")
    if not weights.is_file():
        raise WeightsError(f"{weights} does not exist")
    json_path = weights.with_suffix(".json")
    if json_path.is_file():
        return json.loads(json_path.read_text())
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise WeightsError(f"{json_path} is missing and {weights} carries no config metadata")
    return json.loads(metadata["config"])


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of an exported `.safetensors` file."""
    config = read_export_config(path)
    return load_file(str(Path(path).with_suffix(".safetensors"))), config


def method_weights(source: Path) -> dict[str, torch.Tensor]:
    """What `model.init_from` names, as a method state under `student.`/`teacher.` prefixes:
    an exported method, an exported backbone (-> `student.backbone.`), or a run directory /
    checkpoint tag (verified first)."""
    source = Path(source)
    if source.suffix in (".safetensors", ".json"):
        state, config = read_export(source)
        if config.get("contents", "backbone") == "backbone":
            return {f"{STUDENT}backbone.{k}": v for k, v in state.items()}
        return state
    return checkpoint_method_state(resolve_checkpoint(source))


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def init_method(
    student: nn.Module,
    teacher: nn.Module | None,
    state: dict[str, torch.Tensor],
    *,
    ignore: list[str],
    source: str,
) -> None:
    """Load `state` (from `method_weights`) into a freshly built method, strictly.

    Every key of the method must be given and every given key must belong to it, with the same
    shape, unless an `ignore` pattern (fnmatch) names it: an ignored missing key keeps its
    initialisation, an ignored unexpected key is dropped. A DINO teacher absent from `state`
    starts as a copy of the loaded student, as at the start of any DINO run."""
    expected = {STUDENT + k: v for k, v in student.state_dict().items()}
    copy_teacher = teacher is not None and not any(k.startswith(TEACHER) for k in state)
    if teacher is not None and not copy_teacher:
        expected.update({TEACHER + k: v for k, v in teacher.state_dict().items()})

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)

    missing = [k for k in expected if k not in state and not ignored(k)]
    unexpected = [k for k in state if k not in expected and not ignored(k)]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or reshaped:
        parts = [f"missing: {_listing(missing)}"] if missing else []
        parts += [f"unexpected: {_listing(unexpected)}"] if unexpected else []
        parts += [f"shape differs (given vs model): {_listing(reshaped)}"] if reshaped else []
        raise WeightsError(
            f"model.init_from={source} does not fit this recipe's method; "
            + "; ".join(parts)
            + ". Name keys to leave out in model.init_from_ignore (fnmatch patterns, e.g. "
            "'student.decoder.*')."
        )
    for prefix, module in ((STUDENT, student), (TEACHER, None if copy_teacher else teacher)):
        if module is None:
            continue
        given = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        given = {k: v for k, v in given.items() if prefix + k in expected}
        module.load_state_dict(given, strict=False)
    if copy_teacher:
        own = student.state_dict()
        teacher.load_state_dict({k: own[k] for k in teacher.state_dict()}, strict=True)
    log.info("initialised the method from %s (%d tensors)", source, len(state))

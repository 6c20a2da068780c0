"""Export a pretrained backbone: one consolidated safetensors file + a JSON config to rebuild it.

`export_backbone(source, out)` reads a committed checkpoint (a run directory's newest, or a given
tag directory), takes the teacher's or the student's backbone, and writes
- `out` (`*.safetensors`): the backbone's full fp32 state dict under its own names (`backbone.`
  stripped), which for ViT and Swin are timm's names, with the config in the file's metadata;
- `out.with_suffix(".json")`: `{"backbone", "kwargs", "which", "method", "step", "source", ...}`,
  so that `build_backbone(backbone, **kwargs)` rebuilds the module; `load_exported` does that and
  loads the weights strictly.

Where the weights come from (DeepSpeed 0.19.8, as this engine configures it):
- teacher (DINO's default): `shared-{teacher}.pt`, the full fp32 teacher state dict that the engine
  writes in every ZeRO stage;
- student (MAE's default; DINO's with `which="student"`): the fp32 weights, consolidated from
  DeepSpeed's files. ZeRO 0-2 under fp32: the module copy in `mp_rank_00_model_states.pt` (it *is*
  the master copy). ZeRO-3, or ZeRO-1/2 under bf16/fp16: the fp32 master partitions of the
  optimizer files (the module copy is empty under ZeRO-3 and rounded under bf16/fp16), through
  `deepspeed.utils.zero_to_fp32`; DeepSpeed's BF16 optimizer (ZeRO-1 + bf16 + fp32 gradient
  accumulation) writes files that tool refuses, so those partitions are joined here from the
  optimizer's own name -> slice table.

Only the backbone is exported: exactly the tensors `build_backbone(name, **kwargs)` has (names and
shapes checked), so heads, decoders and the DINO centre are left out, and a backbone's own mask
token (Swin, Twins: part of the module) is kept. Training-only constructor knobs
(`model.drop_path_rate`, `model.grad_checkpointing`) are not in `kwargs`; pass them to
`load_exported` when fine-tuning.

Deliberately not here: any process group (export is one plain process on CPU, runnable on a login
node), conversion to other libraries' module classes, and evaluation of the weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import Recipe, load_recipe
from pipeline.models import build_backbone
from pipeline.train.checkpoint import (
    COMMIT_FILE,
    CheckpointError,
    CheckpointManager,
    read_commit,
    validate,
)

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
PREFIX = "backbone."
WHICH = ("teacher", "student")
_MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the full module copy
_BF16_OPTIM_RE = re.compile(r"^bf16_zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class ExportError(RuntimeError):
    """A checkpoint cannot be exported as asked (the message names the path and what to change)."""


# --------------------------------------------------------------------------- finding the source


def resolve_checkpoint(source: Path) -> Path:
    """The committed tag directory that `source` means: a tag directory itself, or the newest
    committed tag under a run directory (`source/checkpoints`) or a checkpoints root. Our
    `committed` pointer decides, never DeepSpeed's `latest`."""
    source = Path(source)
    if not source.exists():
        raise ExportError(f"{source} does not exist")
    if (source / COMMIT_FILE).is_file() or source.name.startswith("step-"):
        problem = validate(source)
        if problem is not None:
            raise ExportError(f"{source} is not a complete, committed checkpoint: {problem}")
        return source
    root = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    tag = CheckpointManager(root, rank=0, world_size=1).latest()
    if tag is None:
        raise ExportError(
            f"no committed checkpoint under {root} (a run saves one every checkpoint.every_steps "
            f"steps; pass a run directory, its checkpoints/ folder or a step-XXXXXXXX tag)"
        )
    return tag


def run_recipe(tag_dir: Path) -> Recipe:
    """The resolved recipe of the run a tag belongs to (`<run dir>/config.yaml`)."""
    path = Path(tag_dir).parent.parent / "config.yaml"
    if not path.is_file():
        raise ExportError(
            f"{path} not found: export reads the run's resolved recipe to know the backbone of "
            f"{tag_dir} (tags live in <run dir>/checkpoints/)"
        )
    return load_recipe(path)


# --------------------------------------------------------------------------- reading weights


def _torch_load(path: Path) -> Any:
    # DeepSpeed's files pickle its own objects (config, fragment addresses): not weights-only.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def teacher_state(tag_dir: Path, record: dict) -> dict[str, torch.Tensor]:
    """The full fp32 DINO teacher state dict of a tag (`shared-teacher.pt`)."""
    if "teacher" not in record.get("shared", []):
        raise ExportError(
            f"{tag_dir} holds no teacher (its {COMMIT_FILE} lists shared state "
            f"{record.get('shared', [])}); only DINO runs have one: export the student"
        )
    return torch.load(tag_dir / "shared-teacher.pt", map_location="cpu", weights_only=True)


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
        raise ExportError(f"DeepSpeed cannot consolidate the fp32 weights of {tag_dir}: {e}") from e
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
        raise ExportError(
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
            raise ExportError(
                f"{tag_dir}: fp32 fragments of {name} hold {flat.numel()} values, not "
                f"{shape.numel()} (missing or mixed optimizer files?)"
            )
        state[name] = flat.view(shape)
    for name, tensor in model["module"].items():
        if name not in state:  # buffers and frozen parameters
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return state


def backbone_state(
    state: dict[str, torch.Tensor], name: str, kwargs: dict[str, Any], where: str
) -> dict[str, torch.Tensor]:
    """The `backbone.*` entries of a method's state dict, prefix stripped, checked against the
    names and shapes of `build_backbone(name, **kwargs)`; fp32, contiguous, unshared copies."""
    with torch.device("meta"):  # names and shapes only, no memory, no init
        reference = build_backbone(name, **kwargs).state_dict()
    found = {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
    missing = [k for k in reference if k not in found]
    unexpected = [k for k in found if k not in reference]
    if missing or unexpected:
        raise ExportError(
            f"the backbone in {where} does not match build_backbone({name!r}, **{kwargs}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    out = {}
    for key, ref in reference.items():
        tensor = found[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ExportError(
                f"{where}: {PREFIX}{key} has shape {tuple(tensor.shape)}, "
                f"build_backbone({name!r}) makes {tuple(ref.shape)}"
            )
        if tensor.is_floating_point():
            tensor = tensor.float()
        # safetensors refuses tensors that share storage (zero_to_fp32 returns views of one
        # flat buffer): every tensor gets its own.
        out[key] = tensor.detach().contiguous().clone()
    return out


# --------------------------------------------------------------------------- export / load


def checkpoint_weights(
    source: Path, which: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone weights of `source`'s checkpoint and what they are.

    `source`: a run directory (its newest committed checkpoint), its `checkpoints/` folder, or a
    tag directory. `which`: "teacher" or "student"; default teacher for DINO, student for MAE.
    Returns (fp32 state dict for `build_backbone`, config with backbone, kwargs, which, step...).
    No process group needed: every rank may call it on a shared file system.
    """
    tag_dir = resolve_checkpoint(Path(source))
    record = read_commit(tag_dir)
    recipe = run_recipe(tag_dir)
    method = recipe.method.name
    which = which or ("teacher" if method == "dino" else "student")
    if which not in WHICH:
        raise ExportError(f"which={which!r}: choose one of {', '.join(WHICH)}")
    if which == "teacher" and method != "dino":
        raise ExportError(f"{tag_dir} is a {method} run, without a teacher: export the student")

    read = teacher_state if which == "teacher" else student_state
    try:
        full = read(tag_dir, record)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    name, kwargs = recipe.model.backbone, dict(recipe.model.overrides)
    weights = backbone_state(full, name, kwargs, f"the {which} of {tag_dir}")
    config = {
        "format": EXPORT_FORMAT,
        "backbone": name,
        "kwargs": kwargs,
        "which": which,
        "method": method,
        "step": int(record["step"]),
        "source": str(tag_dir.resolve()),
        "zero_stage": int(record["zero_stage"]),
        "world_size": int(record["world_size"]),
        "dtype": "float32",
    }
    return weights, config


def checkpoint_backbone(source: Path, which: str | None = None, **overrides: Any) -> nn.Module:
    """The backbone of a checkpoint, built and loaded strictly (see `checkpoint_weights`)."""
    weights, config = checkpoint_weights(source, which)
    model = build_backbone(config["backbone"], **{**config["kwargs"], **overrides})
    model.load_state_dict(weights, strict=True)
    return model


def export_backbone(source: Path, out: Path, which: str | None = None) -> Path:
    """Write the backbone of `source`'s checkpoint to `out` (`.safetensors`) and `out.json`.

    `source` and `which` as in `checkpoint_weights`. Returns `out`. Files are written under
    temporary names and renamed into place.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"output {out} must end in .safetensors")
    weights, config = checkpoint_weights(source, which)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = exported_config_path(out)
    json_tmp = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    weights_tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    json_tmp.write_text(json.dumps(config, indent=1) + "\n")
    save_file(weights, str(weights_tmp), metadata={"format": "pt", "config": json.dumps(config)})
    # safetensors creates its file owner-only (0600); give it the mode of an ordinary new file.
    shutil.copymode(json_tmp, weights_tmp)
    os.replace(weights_tmp, out)
    os.replace(json_tmp, json_path)
    log.info("exported the %s backbone of %s (step %d) to %s",
             config["which"], config["source"], config["step"], out)  # fmt: skip
    return out


def exported_config_path(weights: Path) -> Path:
    """`model.safetensors` -> `model.json`."""
    return Path(weights).with_suffix(".json")


def read_exported_config(path: Path) -> dict[str, Any]:
    """The config of an export: its JSON file, else the copy in the safetensors metadata."""
    weights = Path(path).with_suffix(".safetensors")
    json_path = exported_config_path(weights)
    if json_path.is_file():
        return json.loads(json_path.read_text())
    if not weights.is_file():
        raise ExportError(f"neither {json_path} nor {weights} exists")
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise ExportError(f"{json_path} is missing and {weights} carries no config metadata")
    return json.loads(metadata["config"])


def load_exported(path: Path, **overrides: Any) -> nn.Module:
    """The exported backbone, rebuilt with `build_backbone` and loaded strictly, in eval mode.

    `path`: the `.safetensors` file (or its `.json`). `overrides` go to `build_backbone` on top of
    the exported kwargs: only knobs that leave the parameters unchanged (`drop_path_rate`,
    `grad_checkpointing`) load strictly.
    """
    weights = Path(path).with_suffix(".safetensors")
    config = read_exported_config(weights)
    model = build_backbone(config["backbone"], **{**config["kwargs"], **overrides})
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()

"""Export pretrained weights: one consolidated safetensors file + a JSON config beside it.

Two kinds of export, from a committed checkpoint (a run directory's newest, or a given tag
directory), which is verified first (content digests, restricted unpickler):
- `export_backbone(source, out, which)`: the teacher's or the student's backbone alone, under its
  own names (`backbone.` stripped; for ViT and Swin these are timm's names): exactly the tensors
  `build_backbone(name, **kwargs)` has, names and shapes checked (a backbone's own mask token, as
  in Swin and Twins, is kept). `load_exported` rebuilds and loads it strictly.
- `export_method(source, out)`: the whole method, to continue pretraining or fine-tune from it
  (`model.init_from`): the student under `student.` (backbone plus the DINO head and centre, or
  the MAE decoder) and DINO's teacher under `teacher.`.
Both write `out` (`*.safetensors`, fp32, the config also in its metadata) and `out.json`:
`{"contents", "backbone", "kwargs", "which", "method", "step", "source", ...}`. Training-only
constructor knobs (`model.drop_path_rate`, `model.grad_checkpointing`) are not in `kwargs`; pass
them to `load_exported` when fine-tuning. How the fp32 weights are read out of DeepSpeed's files
is `pipeline.train.weights`'s business.

Deliberately not here: any process group (export is one plain process on CPU, runnable on a login
node), conversion to other libraries' module classes, and evaluation of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.models import build_backbone
from pipeline.train.checkpoint import CheckpointError, read_commit
from pipeline.train.weights import (
    STUDENT,
    TEACHER,
    WeightsError,
    checkpoint_method_state,
    read_export,
    read_export_config,
    resolve_checkpoint,
    run_recipe,
    student_state,
    teacher_state,
)

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
PREFIX = "backbone."
WHICH = ("teacher", "student")
CONTENTS = ("backbone", "method")

# A checkpoint or export that cannot be read as asked (the message names the path and the fix).
ExportError = WeightsError


# --------------------------------------------------------------------------- reading weights


def backbone_state(
    state: dict[str, torch.Tensor], name: str, kwargs: dict[str, Any], where: str
) -> dict[str, torch.Tensor]:
    """The `backbone.*` entries of a method's state dict, prefix stripped, checked against the
    names and shapes of `build_backbone(name, **kwargs)`; fp32."""
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
        out[key] = (tensor.float() if tensor.is_floating_point() else tensor).detach()
    return out


# --------------------------------------------------------------------------- export / load


def _describe(tag_dir: Path, record: dict, recipe: Any, contents: str, which: str | None) -> dict:
    return {
        "format": EXPORT_FORMAT,
        "contents": contents,
        "backbone": recipe.model.backbone,
        "kwargs": dict(recipe.model.overrides),
        "which": which,
        "method": recipe.method.name,
        "step": int(record["step"]),
        "source": str(tag_dir.resolve()),
        "zero_stage": int(record["zero_stage"]),
        "world_size": int(record["world_size"]),
        "dtype": "float32",
    }


def _default_which(method: str, which: str | None, where: Any) -> str:
    which = which or ("teacher" if method == "dino" else "student")
    if which not in WHICH:
        raise ExportError(f"which={which!r}: choose one of {', '.join(WHICH)}")
    if which == "teacher" and method != "dino":
        raise ExportError(f"{where} is a {method} run, without a teacher: use the student")
    return which


def checkpoint_weights(
    source: Path, which: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone weights of `source`'s checkpoint and what they are.

    `source`: a run directory (its newest committed checkpoint), its `checkpoints/` folder, or a
    tag directory; verified before it is read (digests, restricted unpickler). `which`:
    "teacher" or "student"; default teacher for DINO, student for MAE. Returns (fp32 state dict
    for `build_backbone`, config with backbone, kwargs, which, step...). No process group
    needed: every rank may call it on a shared file system.
    """
    tag_dir = resolve_checkpoint(Path(source))
    record = read_commit(tag_dir)
    recipe = run_recipe(tag_dir)
    which = _default_which(recipe.method.name, which, tag_dir)
    read = teacher_state if which == "teacher" else student_state
    try:
        full = read(tag_dir, record)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    name, kwargs = recipe.model.backbone, dict(recipe.model.overrides)
    weights = backbone_state(full, name, kwargs, f"the {which} of {tag_dir}")
    return weights, _describe(tag_dir, record, recipe, "backbone", which)


def checkpoint_backbone(source: Path, which: str | None = None, **overrides: Any) -> nn.Module:
    """The backbone of a checkpoint, built and loaded strictly (see `checkpoint_weights`)."""
    weights, config = checkpoint_weights(source, which)
    model = build_backbone(config["backbone"], **{**config["kwargs"], **overrides})
    model.load_state_dict(weights, strict=True)
    return model


def _output(out: Path) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"output {out} must end in .safetensors")
    return out


def _write_export(weights: dict[str, torch.Tensor], config: dict[str, Any], out: Path) -> Path:
    """`out` (.safetensors, config in its metadata) and `out.json`, each through a temporary
    name renamed into place."""
    out = _output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = exported_config_path(out)
    json_tmp = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    weights_tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    json_tmp.write_text(json.dumps(config, indent=1) + "\n")
    # safetensors refuses tensors that share storage (zero_to_fp32 returns views of one flat
    # buffer): every tensor gets its own.
    weights = {k: v.detach().contiguous().clone() for k, v in weights.items()}
    save_file(weights, str(weights_tmp), metadata={"format": "pt", "config": json.dumps(config)})
    # safetensors creates its file owner-only (0600); give it the mode of an ordinary new file.
    shutil.copymode(json_tmp, weights_tmp)
    os.replace(weights_tmp, out)
    os.replace(json_tmp, json_path)
    return out


def export_backbone(source: Path, out: Path, which: str | None = None) -> Path:
    """Write the backbone of `source`'s checkpoint to `out` (`.safetensors`) and `out.json`.

    `source` and `which` as in `checkpoint_weights`. Returns `out`."""
    _output(out)  # before any long read
    weights, config = checkpoint_weights(source, which)
    _write_export(weights, config, out)
    log.info("exported the %s backbone of %s (step %d) to %s",
             config["which"], config["source"], config["step"], out)  # fmt: skip
    return Path(out)


def export_method(source: Path, out: Path) -> Path:
    """Write the whole method of `source`'s checkpoint to `out` (`.safetensors`) and `out.json`:
    the student under `student.` (backbone, DINO head and centre, or MAE encoder and decoder)
    and DINO's teacher under `teacher.`, fp32. `model.init_from: out` continues from it."""
    _output(out)  # before any long read
    tag_dir = resolve_checkpoint(Path(source))
    record = read_commit(tag_dir)
    recipe = run_recipe(tag_dir)
    weights = checkpoint_method_state(tag_dir)
    config = _describe(tag_dir, record, recipe, "method", None)
    _write_export(weights, config, out)
    log.info("exported the whole %s method of %s (step %d, %d tensors) to %s",
             config["method"], config["source"], config["step"], len(weights), out)  # fmt: skip
    return Path(out)


def export(source: Path, out: Path, contents: str = "backbone", which: str | None = None) -> Path:
    """`export_backbone` or `export_method`, as `contents` says."""
    if contents not in CONTENTS:
        raise ExportError(f"contents={contents!r}: choose one of {', '.join(CONTENTS)}")
    if contents == "method":
        if which is not None:
            raise ExportError("a whole-method export holds student and teacher: drop --which")
        return export_method(source, out)
    return export_backbone(source, out, which)


def exported_config_path(weights: Path) -> Path:
    """`model.safetensors` -> `model.json`."""
    return Path(weights).with_suffix(".json")


def read_exported_config(path: Path) -> dict[str, Any]:
    """The config of an export: its JSON file, else the copy in the safetensors metadata."""
    return read_export_config(path)


def load_exported(path: Path, which: str | None = None, **overrides: Any) -> nn.Module:
    """The exported backbone, rebuilt with `build_backbone` and loaded strictly, in eval mode.

    `path`: the `.safetensors` file (or its `.json`), a backbone export or a whole-method one (of
    which `which` picks the network: default teacher for DINO, student for MAE). `overrides` go
    to `build_backbone` on top of the exported kwargs: only knobs that leave the parameters
    unchanged (`drop_path_rate`, `grad_checkpointing`) load strictly.
    """
    state, config = read_export(path)
    if config.get("contents", "backbone") == "method":
        which = _default_which(config["method"], which, path)
        prefix = (TEACHER if which == "teacher" else STUDENT) + PREFIX
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model = build_backbone(config["backbone"], **{**config["kwargs"], **overrides})
    model.load_state_dict(state, strict=True)
    return model.eval()

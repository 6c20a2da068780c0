"""The recipe schema: one documented dataclass per section, and the rules that span keys.

Every field carries its help text (`field(metadata={"help": ...})`); sections and keys without a
default are required. Rules within a section live in its `__post_init__`, rules across sections in
`_check_recipe`, run when a `Recipe` is built; every message names the keys to change.

Loading, overrides and dumping live in `pipeline.config`, which re-exports everything public here;
import from there. Like it, this module imports nothing else from `pipeline` (config sits at the
bottom of the import graph), so the backbone naming table mirrors `pipeline.models.registry`; a test
keeps the two in agreement. YAML holds values only, never class paths.
"""

# ruff: noqa: RUF009 - `_f` is `dataclasses.field` with a help text; it returns a field, not a value.

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal


class RecipeError(ValueError):
    """A recipe that must not run: unknown key, wrong type, broken `base:` chain, broken rule."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(message)


def _at_least(prefix: str, obj: object, minimum: float, *names: str) -> None:
    """Every named field of `obj` that is set must be >= minimum."""
    for name in names:
        value = getattr(obj, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            _check(v is None or v >= minimum, f"{prefix}.{name}={value} must be >= {minimum}.")


def _plain_text(prefix: str, obj: object, *names: str) -> None:
    """Every named string (or list of strings) holds no control character: these values end up
    in a generated batch script or on a command line, where a newline starts a new command."""
    for name in names:
        value = getattr(obj, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            bad = [c for c in v or "" if ord(c) < 32 or ord(c) == 127]
            if bad:
                raise RecipeError(
                    f"{prefix}.{name}={v!r} holds the control character {bad[0]!r}, which would "
                    f"break the generated job script (a newline starts a new command); use plain "
                    f"text."
                )


def _fraction(prefix: str, obj: object, *names: str) -> None:
    """Every named field (a probability or a list of them) must lie in [0, 1]."""
    for name in names:
        value = getattr(obj, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        ok = all(0.0 <= v <= 1.0 for v in values)
        _check(ok, f"{prefix}.{name}={value} must lie in [0, 1].")


# ---------------------------------------------------------------------------------------------
# Backbone names (mirrors pipeline.models.registry, which config must not import).

_VIT_SIZES = ("tiny", "small", "base", "large", "huge")
BACKBONE_NAMES: tuple[str, ...] = (
    "vit_tiny_patch4",  # for small images (the 32-pixel quickstart)
    *(f"vit_{size}_patch{patch}" for size in _VIT_SIZES for patch in (8, 14, 16)),
    *(f"swin_{size}" for size in ("tiny", "small", "base", "large")),
    *(f"twins_svt_{size}" for size in ("small", "base", "large")),
)
HIERARCHICAL_MASK_STRIDE = 32  # Swin/Twins coarsest stage stride: where SimMIM-style masks live.


def input_stride(backbone: str) -> int:
    """Input sides must be multiples of this: a ViT's patch size, the 4x4 stem of Swin/Twins."""
    _check(backbone in BACKBONE_NAMES, _unknown_backbone(backbone))
    return int(backbone.rsplit("patch", 1)[1]) if backbone.startswith("vit_") else 4


def is_hierarchical(backbone: str) -> bool:
    """Swin and Twins-SVT: feature pyramids, masked with mask tokens (SimMIM), not by dropping."""
    return backbone.startswith(("swin_", "twins_svt_"))


def _unknown_backbone(name: str) -> str:
    close = difflib.get_close_matches(name, BACKBONE_NAMES, n=1, cutoff=0.5)
    hint = f" did you mean {close[0]!r}?" if close else ""
    known = ", ".join(BACKBONE_NAMES)
    return f"model.backbone={name!r} is not a known backbone;{hint} known: {known}."


# ---------------------------------------------------------------------------------------------
# The schema. Every field carries its help text; sections without a default are required.


def _f(default: Any = MISSING, doc: str = "") -> Any:
    """A documented field; mutable defaults and section classes become default factories."""
    meta = {"help": doc}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


Scalar = bool | int | float | str
Stage = Literal["pretrain", "knn", "logreg", "linear", "finetune"]
STAGES: tuple[str, ...] = typing.get_args(Stage)


@dataclass(kw_only=True)
class RunConfig:
    """`run`: what the run is called, where it lives, how it is seeded."""

    name: str = _f(doc="run name; the run directory is <run.dir>/<run.name>")
    dir: str = _f("runs", "parent folder of run directories")
    seed: int = _f(0, "base seed; every RNG stream derives from (seed, rank, worker, epoch)")

    def __post_init__(self) -> None:
        ok = bool(self.name) and "/" not in self.name and self.name not in (".", "..")
        _check(ok, f"run.name={self.name!r} must be a plain folder name (non-empty, no '/').")
        _plain_text("run", self, "name", "dir")  # both name the job's log paths


@dataclass(kw_only=True)
class TrainShards:
    """`data.train`: the pretraining images (their labels also serve the evaluation stages)."""

    shards: str = _f(doc="shard folder with manifest.json, or a brace pattern of .tar shards")


@dataclass(kw_only=True)
class ValShards:
    """`data.val`: labelled validation images for k-NN, linear probe and fine-tune."""

    shards: str | None = _f(None, "shard folder or brace pattern; null = no evaluation data")


@dataclass(kw_only=True)
class CropsConfig:
    """`data.crops`: random-resized crops, cut and resized in uint8 on the CPU workers, or on the
    training device (`on_device`: the workers only decode and sample the boxes)."""

    global_size: int = _f(224, "DINO global crop side in pixels")
    global_scale: tuple[float, float] = _f((0.32, 1.0), "DINO global crop area range")
    local_number: int = _f(10, "DINO local crops per image (0 = none)")
    local_size: int = _f(96, "DINO local crop side in pixels")
    local_scale: tuple[float, float] = _f((0.05, 0.32), "DINO local crop area range")
    mae_size: int = _f(224, "MAE / SimMIM crop side in pixels")
    mae_scale: tuple[float, float] = _f((0.2, 1.0), "MAE / SimMIM crop area range")
    ratio: tuple[float, float] = _f((0.75, 4 / 3), "aspect-ratio range of every random crop")
    hflip: float = _f(0.5, "probability of a horizontal flip")
    on_device: bool | None = _f(
        None, "cut and resize the crops on the training device; null = when it is a GPU"
    )
    device_max_side: int | None = _f(
        None, "on_device: workers shrink images to at most this longer side (bounds bytes moved)"
    )

    def __post_init__(self) -> None:
        _at_least("data.crops", self, 1, "global_size", "local_size", "mae_size", "device_max_side")
        _at_least("data.crops", self, 0, "local_number")
        _fraction("data.crops", self, "global_scale", "local_scale", "mae_scale", "hflip")
        for name in ("global_scale", "local_scale", "mae_scale", "ratio"):
            lo, hi = getattr(self, name)
            _check(0 < lo <= hi, f"data.crops.{name}=[{lo}, {hi}] must satisfy 0 < low <= high.")


@dataclass(kw_only=True)
class ColorConfig:
    """`data.color`: batched on-device augmentation and normalisation (DINO's recipe).

    The three-element probabilities are (first global view, second global view, local views)."""

    enabled: bool = _f(True, "apply jitter/grayscale/blur/solarise; MAE only flips and normalises")
    jitter_p: float = _f(0.8, "probability of colour jitter")
    brightness: float = _f(0.4, "colour jitter: brightness strength")
    contrast: float = _f(0.4, "colour jitter: contrast strength")
    saturation: float = _f(0.2, "colour jitter: saturation strength")
    hue: float = _f(0.1, "colour jitter: hue strength")
    grayscale_p: float = _f(0.2, "probability of converting to grayscale")
    blur_p: tuple[float, float, float] = _f((1.0, 0.1, 0.5), "Gaussian blur probability per view")
    solarize_p: tuple[float, float, float] = _f((0.0, 0.2, 0.0), "solarisation prob. per view")
    mean: tuple[float, float, float] = _f((0.485, 0.456, 0.406), "normalisation mean (RGB, 0..1)")
    std: tuple[float, float, float] = _f((0.229, 0.224, 0.225), "normalisation std (RGB, 0..1)")

    def __post_init__(self) -> None:
        _fraction("data.color", self, "jitter_p", "grayscale_p", "blur_p", "solarize_p", "hue")
        _at_least("data.color", self, 0, "brightness", "contrast", "saturation")
        _check(all(s > 0 for s in self.std), f"data.color.std={self.std} must be positive.")


@dataclass(kw_only=True)
class BucketsConfig:
    """`data.buckets`: group images of similar aspect ratio so crops keep their shape."""

    enabled: bool = _f(False, "crop to bucketed aspect ratios instead of squares")
    aspect_ratios: list[float] = _f([0.5, 0.75, 1.0, 4 / 3, 2.0], "bucket width/height ratios")
    token_budget: int | None = _f(None, "patch tokens per global crop; null = as for a square")
    batch_tokens: int | None = _f(
        None, "global-crop patch tokens per batch; null = train.batch_size x square-crop tokens"
    )
    navit: bool = _f(
        False,
        "ViT only: native-resolution images packed into sequences (NaViT); train.batch_size and "
        "the logged samples count sequences, images_per_s and images count images",
    )
    max_side: int = _f(512, "NaViT: longer image side is capped to this many pixels")
    seq_len: int = _f(1024, "NaViT: tokens per packed sequence")

    def __post_init__(self) -> None:
        ratios = self.aspect_ratios
        ok = bool(ratios) and all(r > 0 for r in ratios)
        _check(ok, f"data.buckets.aspect_ratios={ratios} must be a non-empty list of positives.")
        _at_least("data.buckets", self, 1, "token_budget", "batch_tokens", "max_side", "seq_len")


@dataclass(kw_only=True)
class DataConfig:
    """`data`: shards, streaming loader and augmentations."""

    train: TrainShards = _f(doc="pretraining shards")
    val: ValShards = _f(ValShards, "evaluation shards")
    workers: int = _f(8, "loader worker processes per rank")
    mode: Literal["exact", "resampled"] = _f(
        "exact", "exact: each sample once per epoch, equal steps per rank; resampled: endless"
    )
    shuffle_buffer: int = _f(2000, "samples each worker holds for shuffling (0 = shard order)")
    max_bad_fraction: float = _f(0.001, "stop when more than this share of samples fails to decode")
    crops: CropsConfig = _f(CropsConfig, "training crops")
    color: ColorConfig = _f(ColorConfig, "device-side augmentation")
    buckets: BucketsConfig = _f(BucketsConfig, "aspect-ratio buckets")
    eval_resize: int = _f(256, "evaluation: resize the short side to this, then centre-crop")
    eval_crop: int = _f(224, "evaluation (and fine-tune) crop side in pixels")

    def __post_init__(self) -> None:
        _at_least("data", self, 0, "workers", "shuffle_buffer")
        _at_least("data", self, 1, "eval_crop")
        _fraction("data", self, "max_bad_fraction")
        _check(
            not (self.crops.on_device and self.buckets.navit),
            "data.crops.on_device=true does not apply to data.buckets.navit=true (NaViT packs "
            "views cut on the CPU): set one of them to false.",
        )
        _check(
            self.eval_resize >= self.eval_crop,
            f"data.eval_resize={self.eval_resize} must be >= data.eval_crop={self.eval_crop}.",
        )


@dataclass(kw_only=True)
class ModelConfig:
    """`model`: the backbone, built as `build_backbone(backbone, **overrides, ...)`."""

    backbone: str = _f(doc="a name from BACKBONE_NAMES, e.g. vit_base_patch16, swin_tiny")
    drop_path_rate: float = _f(0.0, "stochastic depth rate of the last block")
    grad_checkpointing: bool = _f(False, "recompute block activations in backward to save memory")
    overrides: dict[str, Scalar | list[Scalar]] = _f(
        {}, "extra constructor arguments, e.g. {depth: 4, embed_dim: 64} for test models"
    )
    init_from: str | None = _f(
        None,
        "start from these weights: an export (.safetensors, backbone or whole method) or a run "
        "directory / checkpoint tag; every missing or unexpected key is an error",
    )
    init_from_ignore: list[str] = _f(
        [], "key patterns (fnmatch, e.g. 'student.decoder.*') that init_from may leave out or drop"
    )

    def __post_init__(self) -> None:
        _check(self.backbone in BACKBONE_NAMES, _unknown_backbone(self.backbone))
        _check(0 <= self.drop_path_rate < 1, "model.drop_path_rate must lie in [0, 1).")
        for key in ("drop_path_rate", "grad_checkpointing"):
            _check(key not in self.overrides, f"set model.{key}, not model.overrides.{key}.")


@dataclass(kw_only=True)
class MaeConfig:
    """`method.mae`: masked image modelling; MAE proper on ViT, SimMIM-style on Swin/Twins."""

    mask_ratio: float = _f(0.75, "share of mask units hidden from the encoder")
    mask_patch_size: int | None = _f(
        None, "mask unit in pixels; null = the patch (ViT) or the coarsest stage stride (32)"
    )
    decoder_depth: int = _f(8, "decoder transformer blocks; 0 = one linear prediction layer")
    decoder_dim: int = _f(512, "decoder width")
    decoder_heads: int = _f(16, "decoder attention heads")
    norm_pix_loss: bool = _f(True, "regress per-patch normalised pixels")
    loss: Literal["l2", "l1"] = _f("l2", "pixel loss on masked patches (MAE: l2, SimMIM: l1)")

    def __post_init__(self) -> None:
        _check(0 < self.mask_ratio < 1, "method.mae.mask_ratio must lie in (0, 1).")
        _at_least("method.mae", self, 0, "decoder_depth")
        _at_least("method.mae", self, 1, "decoder_dim", "decoder_heads", "mask_patch_size")
        _check(
            self.decoder_depth == 0 or self.decoder_dim % self.decoder_heads == 0,
            f"method.mae.decoder_dim={self.decoder_dim} is not divisible by "
            f"method.mae.decoder_heads={self.decoder_heads}.",
        )


@dataclass(kw_only=True)
class DinoConfig:
    """`method.dino`: self-distillation with a momentum teacher and multi-crop."""

    out_dim: int = _f(65536, "prototypes in the projection head")
    hidden_dim: int = _f(2048, "hidden width of the head MLP")
    bottleneck_dim: int = _f(256, "width before the weight-normalised last layer")
    norm_last_layer: bool = _f(True, "fix the last layer's weight norm (more stable)")
    head_bn: bool = _f(False, "BatchNorm (batch statistics) in the head's MLP, DINO's use_bn")
    koleo_weight: float = _f(0.0, "KoLeo regulariser on the global views' features (DINOv2)")
    ibot_weight: float = _f(
        0.0, "iBOT masked-patch loss on the global crops, weight (DINOv2: 1.0); 0 = off"
    )
    ibot_separate_head: bool = _f(False, "iBOT with a projection head of its own (else DINO's)")
    ibot_mask_ratio: tuple[float, float] = _f(
        (0.1, 0.5), "iBOT: share of a masked sample's patches hidden, uniform in [min, max]"
    )
    ibot_mask_probability: float = _f(0.5, "iBOT: probability that a sample is masked at all")
    ibot_mask_shape: Literal["block", "random"] = _f(
        "block",
        "iBOT: which patches a masked sample hides: rectangles of patches (DINOv2's; may fall a "
        "few short of the ratio's count), or patches picked uniformly at random (the exact count)",
    )
    centering: Literal["center", "sinkhorn_knopp"] = _f(
        "center", "teacher centring: DINO's running centre, or DINOv2's Sinkhorn-Knopp"
    )
    teacher_temp: float = _f(0.07, "teacher temperature after warm-up")
    warmup_teacher_temp: float = _f(0.04, "teacher temperature at step 0")
    warmup_teacher_temp_epochs: int = _f(
        30,
        "epochs of teacher-temperature warm-up: linspace(warmup_teacher_temp, teacher_temp, N) "
        "indexed by the epoch, constant within an epoch, as DINO's code",
    )
    teacher_temp_per_step: bool = _f(
        False, "ramp the teacher temperature every step (reaching teacher_temp after N epochs)"
    )
    student_temp: float = _f(0.1, "student temperature")
    center_momentum: float = _f(0.9, "EMA momentum of the teacher-output centre")
    momentum_teacher: float = _f(0.996, "teacher EMA momentum at step 0; cosine to 1.0")
    freeze_last_layer_epochs: int = _f(1, "epochs the head's last layer stays frozen")

    def __post_init__(self) -> None:
        _at_least("method.dino", self, 1, "out_dim", "hidden_dim", "bottleneck_dim")
        _at_least("method.dino", self, 0, "warmup_teacher_temp_epochs", "freeze_last_layer_epochs")
        _fraction("method.dino", self, "center_momentum", "momentum_teacher")
        _fraction("method.dino", self, "ibot_mask_probability")
        _at_least("method.dino", self, 0, "ibot_weight")
        low, high = self.ibot_mask_ratio
        _check(
            0 <= low <= high < 1,
            f"method.dino.ibot_mask_ratio={list(self.ibot_mask_ratio)} must be [min, max] with "
            "0 <= min <= max < 1.",
        )
        for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            _check(getattr(self, name) > 0, f"method.dino.{name} must be positive.")


@dataclass(kw_only=True)
class MethodConfig:
    """`method`: which objective runs; only the section named by `name` is used."""

    name: Literal["mae", "dino"] = _f(doc="pretraining objective")
    mae: MaeConfig = _f(MaeConfig, "MAE / SimMIM settings")
    dino: DinoConfig = _f(DinoConfig, "DINO settings")


@dataclass(kw_only=True)
class OptimConfig:
    """`optim`: AdamW with linear warm-up, then cosine decay of lr (and of weight decay), or
    warm-up, constant and a cosine cool-down (`schedule: wsd`)."""

    lr: float = _f(5e-4, "peak learning rate per 256 images (scaled by global batch / 256)")
    min_lr: float = _f(1e-6, "final learning rate of the cosine (absolute, not scaled)")
    weight_decay: float = _f(0.04, "weight decay at step 0")
    weight_decay_end: float | None = _f(None, "weight decay at the end (cosine); null = constant")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup_epochs: float = _f(
        10.0,
        "linear lr warm-up from 0, in epochs (may be fractional); DINO: linspace(0, peak, N) as "
        "its code, MAE: peak x step / N as its code",
    )
    schedule: Literal["cosine", "wsd"] = _f(
        "cosine",
        "after the warm-up: cosine to min_lr over the rest of the run, or wsd: constant, then a "
        "cosine cool-down to min_lr over the last optim.decay_fraction of the run (weight decay "
        "and teacher momentum hold until it too)",
    )
    decay_fraction: float = _f(
        0.2,
        "wsd: fraction of the run's steps the cool-down takes; 0 = hold the peak to the end, to "
        "anneal later by resuming with a longer train.epochs and a cool-down after that step",
    )
    clip_grad: float = _f(0.0, "max global gradient norm; 0 = no clipping")
    layer_decay: float = _f(
        1.0, "not used in pretraining, only 1 is accepted (fine-tuning: eval.finetune.layer_decay)"
    )

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be positive.")
        _at_least("optim", self, 0, "min_lr", "weight_decay", "weight_decay_end", "eps")
        _at_least("optim", self, 0, "warmup_epochs", "clip_grad")
        _fraction("optim", self, "decay_fraction")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas={self.betas} must lie in [0, 1).")
        # Layer-wise lr decay is a fine-tuning setting; pretraining never read it.
        _check(
            self.layer_decay == 1.0,
            f"optim.layer_decay={self.layer_decay} does not apply to pretraining (no layer-wise "
            "lr decay there): remove it; for fine-tuning set eval.finetune.layer_decay.",
        )


@dataclass(kw_only=True)
class TrainConfig:
    """`train`: how long and at which batch size and precision the pretraining loop runs."""

    epochs: int | None = _f(100, "length in epochs (set train.steps to null)")
    steps: int | None = _f(None, "length in optimizer steps (set train.epochs to null)")
    batch_size: int = _f(64, "images per rank per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = _f("bf16", "training precision")
    nan_policy: Literal["stop", "skip"] = _f("stop", "on a non-finite loss: stop, or skip the step")
    compile: bool = _f(
        False, "torch.compile every transformer block (backbone, MAE decoder, DINO teacher)"
    )

    def __post_init__(self) -> None:
        _check(
            (self.epochs is None) != (self.steps is None),
            f"exactly one of train.epochs={self.epochs} and train.steps={self.steps} must be set; "
            "set the other to null (e.g. train.epochs=null).",
        )
        _at_least("train", self, 1, "epochs", "steps", "batch_size", "grad_accum")
        # A skipped micro-step never reaches DeepSpeed's backward, whose micro-step count decides
        # where optimizer steps fall: with accumulation the boundaries would drift between ranks.
        _check(
            self.nan_policy == "stop" or self.grad_accum == 1,
            f"train.nan_policy=skip needs train.grad_accum=1 (got {self.grad_accum}): a skipped "
            "micro-step would shift DeepSpeed's accumulation boundaries; use nan_policy=stop.",
        )


@dataclass(kw_only=True)
class CheckpointConfig:
    """`checkpoint`: sharded DeepSpeed checkpoints under <run dir>/checkpoints."""

    every_steps: int = _f(1000, "save every N optimizer steps (and on preemption)")
    keep: int = _f(2, "checkpoints kept; older ones are deleted")
    verify: Literal["content", "size"] = _f(
        "content",
        "what a resume checks before loading: every file's SHA-256 (content) or only its size "
        "(size: for runs too large to re-read at every resume)",
    )

    def __post_init__(self) -> None:
        _at_least("checkpoint", self, 1, "every_steps", "keep")


@dataclass(kw_only=True)
class LogConfig:
    """`log`: metrics.jsonl and TensorBoard."""

    every_steps: int = _f(20, "log every N optimizer steps")
    tensorboard: bool = _f(True, "also write TensorBoard events")
    sample_ids: bool = _f(False, "audit: each rank writes every step's global sample ids")

    def __post_init__(self) -> None:
        _at_least("log", self, 1, "every_steps")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """`deepspeed`: ZeRO settings of the pretraining engine."""

    zero_stage: int = _f(1, "ZeRO stage 0..3")
    offload_optimizer: bool = _f(False, "keep optimizer states in CPU memory")

    def __post_init__(self) -> None:
        _check(0 <= self.zero_stage <= 3, f"deepspeed.zero_stage={self.zero_stage} must be 0..3.")


@dataclass(kw_only=True)
class KnnConfig:
    """`eval.knn`: weighted k-NN classifier on frozen features."""

    k: list[int] = _f([10, 20, 100, 200], "neighbour counts to report")
    temperature: float = _f(0.07, "temperature of the similarity weighting")

    def __post_init__(self) -> None:
        _check(bool(self.k), "eval.knn.k must list at least one neighbour count.")
        _at_least("eval.knn", self, 1, "k")
        _check(self.temperature > 0, "eval.knn.temperature must be positive.")


@dataclass(kw_only=True)
class LinearConfig:
    """`eval.linear`: linear classifiers on frozen features, one per learning rate, in parallel."""

    lrs: list[float] = _f([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3], "lr sweep per 256")
    epochs: int = _f(100, "training epochs")
    batch_size: int = _f(256, "images per rank")
    few_shot: list[int] = _f([], "also probe with N labelled images per class, for each N")

    def __post_init__(self) -> None:
        _check(bool(self.lrs) and all(lr > 0 for lr in self.lrs), "eval.linear.lrs must be > 0.")
        _at_least("eval.linear", self, 1, "epochs", "batch_size", "few_shot")


@dataclass(kw_only=True)
class LogregConfig:
    """`eval.logreg`: logistic regression by full-batch L-BFGS, C chosen on a held-out split."""

    cs: list[float] = _f(
        [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
        "inverse L2 strengths to try (scikit-learn's C)",
    )
    feature: str = _f("pooled", "input: pooled, avg, clsN or clsN+avg (ViT class tokens)")
    max_iter: int = _f(1000, "L-BFGS iterations per fit")
    tol: float = _f(1e-6, "stop when the largest gradient entry is below this")

    def __post_init__(self) -> None:
        _check(bool(self.cs) and all(c > 0 for c in self.cs), "eval.logreg.cs must be > 0.")
        _check(
            self.feature in ("pooled", "avg")
            or re.fullmatch(r"cls\d*(\+avg)?", self.feature) is not None,
            f"eval.logreg.feature={self.feature!r}: use pooled, avg, clsN or clsN+avg.",
        )
        _at_least("eval.logreg", self, 1, "max_iter")
        _check(self.tol > 0, "eval.logreg.tol must be positive.")


@dataclass(kw_only=True)
class FinetuneConfig:
    """`eval.finetune`: end-to-end fine-tuning with a classifier head."""

    epochs: int = _f(100, "training epochs")
    lr: float = _f(5e-4, "peak learning rate per 256 images")
    batch_size: int = _f(128, "images per rank")
    weight_decay: float = _f(0.05, "weight decay")
    warmup_epochs: float = _f(5.0, "linear lr warm-up in epochs")
    layer_decay: float = _f(0.65, "layer-wise lr decay; 1 = off")
    drop_path: float = _f(0.1, "stochastic depth rate")
    label_smoothing: float = _f(0.1, "label smoothing")
    mixup: float = _f(0.8, "mixup alpha; 0 = off")
    cutmix: float = _f(1.0, "cutmix alpha; 0 = off")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "training crop area range (DeiT / MAE)")
    crop_ratio: tuple[float, float] = _f((0.75, 4 / 3), "training crop aspect-ratio range")
    hflip: float = _f(0.5, "probability of a horizontal flip of a training crop")

    def __post_init__(self) -> None:
        _check(
            0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            f"eval.finetune.crop_scale={list(self.crop_scale)} must satisfy 0 < lo <= hi <= 1.",
        )
        _check(
            0 < self.crop_ratio[0] <= self.crop_ratio[1],
            f"eval.finetune.crop_ratio={list(self.crop_ratio)} must satisfy 0 < lo <= hi.",
        )
        _fraction("eval.finetune", self, "hflip")
        _at_least("eval.finetune", self, 1, "epochs", "batch_size")
        _at_least("eval.finetune", self, 0, "weight_decay", "warmup_epochs", "mixup", "cutmix")
        _fraction("eval.finetune", self, "label_smoothing", "drop_path")
        _check(self.lr > 0 and 0 < self.layer_decay <= 1, "eval.finetune lr/layer_decay invalid.")


@dataclass(kw_only=True)
class EvalConfig:
    """`eval`: the evaluation stages (which ones run is `stages`)."""

    batch_size: int = _f(256, "images per rank for feature extraction")
    checkpoint: str | None = _f(
        None,
        "what to evaluate: a run dir, checkpoints folder, tag or exported .safetensors; "
        "null = this run's newest committed checkpoint",
    )
    which: Literal["teacher", "student"] | None = _f(
        None, "network to evaluate; null = the teacher for DINO, the encoder for MAE"
    )
    baselines: list[Literal["random_init", "pixels"]] = _f(
        ["random_init", "pixels"],
        "also probe these (k-NN, logreg, linear): the backbone at random initialisation, and the "
        "evaluation crop's pixels (downsampled to <= 4096 values)",
    )
    knn: KnnConfig = _f(KnnConfig, "k-NN")
    logreg: LogregConfig = _f(LogregConfig, "logistic regression")
    linear: LinearConfig = _f(LinearConfig, "linear probe")
    finetune: FinetuneConfig = _f(FinetuneConfig, "fine-tuning")

    def __post_init__(self) -> None:
        _at_least("eval", self, 1, "batch_size")


@dataclass(kw_only=True)
class LaunchConfig:
    """`launch`: where the job runs; the launcher's command-line options override these."""

    nodes: int = _f(1, "SLURM nodes")
    gpus_per_node: int = _f(8, "GPUs (= tasks) per node; 0 = CPU only")
    cpus_per_task: int = _f(10, "CPU cores per task (loader workers + 1)")
    mem_gb: int = _f(0, "memory per node in GB; 0 = the partition default")
    partition: str | None = _f(None, "SLURM partition")
    account: str | None = _f(None, "SLURM account")
    qos: str | None = _f(None, "SLURM quality of service")
    constraint: str | None = _f(None, "SLURM node feature constraint")
    time_min: int = _f(4320, "time limit in minutes; the job checkpoints and requeues at it")
    exclusive: bool = _f(False, "request whole nodes")
    sbatch_args: list[str] = _f([], "extra sbatch options, e.g. ['--reservation=x']")
    job_name: str | None = _f(None, "SLURM job name; null = run.name")
    nproc: int = _f(1, "processes in local mode")
    local: bool = _f(False, "run as local processes instead of submitting to SLURM")

    def __post_init__(self) -> None:
        _at_least("launch", self, 1, "nodes", "cpus_per_task", "time_min", "nproc")
        _at_least("launch", self, 0, "gpus_per_node", "mem_gb")
        _plain_text("launch", self, "partition", "account", "qos", "constraint", "job_name",
                    "sbatch_args")  # fmt: skip


@dataclass(kw_only=True)
class Recipe:
    """A whole resolved recipe; the cross-section rules run on construction."""

    run: RunConfig = _f(doc="run naming")
    data: DataConfig = _f(doc="data")
    model: ModelConfig = _f(doc="backbone")
    method: MethodConfig = _f(doc="objective")
    optim: OptimConfig = _f(OptimConfig, "optimizer and schedules")
    train: TrainConfig = _f(TrainConfig, "training length and batch")
    checkpoint: CheckpointConfig = _f(CheckpointConfig, "checkpointing")
    log: LogConfig = _f(LogConfig, "logging")
    deepspeed: DeepSpeedConfig = _f(DeepSpeedConfig, "DeepSpeed engine")
    eval: EvalConfig = _f(EvalConfig, "evaluation stages")
    launch: LaunchConfig = _f(LaunchConfig, "job placement")
    stages: list[Stage] = _f(["pretrain"], "stages to run, in order")

    def __post_init__(self) -> None:
        _check_recipe(self)


def _check_recipe(r: Recipe) -> None:
    """Rules that span sections; each message names every key involved."""
    # ZeRO-3 gathers and frees each parameter in hooks around every submodule's forward; a
    # compiled block would either break into a graph per hook or capture parameters that are
    # freed right after: both are wrong or slow, so the combination is refused.
    _check(
        not (r.train.compile and r.deepspeed.zero_stage == 3),
        "train.compile=true with deepspeed.zero_stage=3: ZeRO-3 gathers and frees parameters in "
        "hooks around each submodule, which compiled blocks cannot follow; use "
        "deepspeed.zero_stage=2 (or 1) to compile, or train.compile=false.",
    )
    backbone = f"model.backbone={r.model.backbone}"
    stride = input_stride(r.model.backbone)
    crops = {
        "data.crops.global_size": r.data.crops.global_size,
        "data.crops.local_size": r.data.crops.local_size,
        "data.crops.mae_size": r.data.crops.mae_size,
        "data.eval_crop": r.data.eval_crop,
    }
    for key, size in crops.items():
        _check(
            size % stride == 0,
            f"{key}={size} is not divisible by the input stride {stride} of {backbone}.",
        )
    if r.method.name == "mae":
        # Masks live on a grid of mask units: the coarsest stage for Swin/Twins, else the patch.
        hier = is_hierarchical(r.model.backbone)
        grid = HIERARCHICAL_MASK_STRIDE if hier else stride
        unit = r.method.mae.mask_patch_size or grid
        _check(
            unit % grid == 0,
            f"method.mae.mask_patch_size={unit} is not a multiple of {grid}, the "
            f"{'coarsest stage stride' if hier else 'input stride'} of {backbone}.",
        )
        size = r.data.crops.mae_size  # the only crop MAE trains on
        _check(
            size % unit == 0,
            f"data.crops.mae_size={size} is not divisible by {unit}, the mask unit of "
            f"method.name=mae on {backbone} (method.mae.mask_patch_size, by default "
            f"{'the coarsest stage stride' if hier else 'the patch size'}).",
        )
    if r.method.name == "dino" and r.method.dino.ibot_weight > 0:
        # iBOT swaps masked patch tokens for a learned mask token before the blocks.
        _check(
            r.model.backbone.startswith("vit_"),
            f"method.dino.ibot_weight={r.method.dino.ibot_weight} masks ViT patch tokens; "
            f"{backbone} is not a ViT: set method.dino.ibot_weight=0.",
        )
        _check(
            not r.data.buckets.navit,
            f"method.dino.ibot_weight={r.method.dino.ibot_weight} with data.buckets.navit=true: "
            "iBOT's masks are not drawn for packed images; set one of them off.",
        )
    if r.data.buckets.navit:
        _check(
            r.model.backbone.startswith("vit_"),
            f"data.buckets.navit=true packs ViT token sequences; {backbone} is not a ViT.",
        )
        _check(
            r.data.buckets.max_side % stride == 0,
            f"data.buckets.max_side={r.data.buckets.max_side} is not divisible by the input "
            f"stride {stride} of {backbone}.",
        )
        unit = r.method.mae.mask_patch_size
        _check(
            r.method.name != "mae" or unit in (None, stride),
            f"method.mae.mask_patch_size={unit} with data.buckets.navit=true: packed images mask "
            f"single patches ({stride} px for {backbone}); remove the key.",
        )
    if r.train.precision != "fp32" and r.train.grad_accum > 1:
        # Without ZeRO, DeepSpeed accumulates bf16/fp16 gradients in their own precision.
        _check(
            r.deepspeed.zero_stage >= 1,
            f"train.precision={r.train.precision} with train.grad_accum={r.train.grad_accum} "
            f"needs deepspeed.zero_stage >= 1 (fp32 accumulation); it is 0.",
        )
    dup = sorted({s for s in r.stages if r.stages.count(s) > 1})
    _check(not dup, f"stages={r.stages} lists {', '.join(dup)} more than once.")
    evals = [s for s in r.stages if s != "pretrain"]
    if evals:
        _check(
            r.data.val.shards is not None,
            f"stages={r.stages} includes {evals[0]}, which needs data.val.shards; set it.",
        )
    if r.train.epochs is not None:
        _check(
            r.optim.warmup_epochs <= r.train.epochs,
            f"optim.warmup_epochs={r.optim.warmup_epochs} exceeds train.epochs={r.train.epochs}.",
        )
        if r.optim.schedule == "wsd":
            cooldown = r.optim.decay_fraction * r.train.epochs
            _check(
                r.optim.warmup_epochs + cooldown <= r.train.epochs + 1e-9,  # 0.7 x 10 = 7.000...1
                f"optim.warmup_epochs={r.optim.warmup_epochs} plus the wsd cool-down "
                f"(optim.decay_fraction={r.optim.decay_fraction} x train.epochs={r.train.epochs}"
                f" = {cooldown:g} epochs) exceed train.epochs; lower one of them.",
            )

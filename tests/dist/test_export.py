"""Export end to end: real checkpoints written by `pretrain`, exported, rebuilt, compared.

Training runs in spawned processes (one process group per world size, several runs each); the
export itself runs here, in the test process, which never joins a process group. Each training
process also keeps the student backbone's weights as the engine held them after its last step
(the state the final checkpoint was written from), gathered under ZeRO-3: the reference that
the exported weights must equal exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.config import load_recipe
from pipeline.eval.export import ExportError, export_backbone, load_exported
from pipeline.models import build_backbone
from pipeline.train.distributed import finish_and_exit, free_port, rank_environ

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "debug"
REFERENCE = "reference-student.pt"
SWIN = "model.overrides={embed_dim: 16, depths: [1, 1, 2, 1], num_heads: [1, 2, 2, 4]}"


def _train_main(rank: int, world_size: int, port: int, jobs: list, out: str) -> None:
    os.environ.update(rank_environ(rank, world_size, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed

    from pipeline.train.distributed import DistEnv
    from pipeline.train.engine import pretrain

    # The test's window on the engines `pretrain` builds (the student's comes first).
    engines: list = []
    initialize = deepspeed.initialize

    def capture(*args, **kwargs):
        result = initialize(*args, **kwargs)
        engines.append(result[0])
        return result

    deepspeed.initialize = capture
    for name, recipe, overrides in jobs:
        engines.clear()
        run_dir = Path(out) / name
        pretrain(load_recipe(RECIPES / recipe, overrides), DistEnv(rank, rank, world_size), run_dir)
        backbone = engines[0].module.backbone
        # A no-op for ZeRO 0-2 parameters; under ZeRO-3 every rank takes part in the gather.
        with deepspeed.zero.GatheredParameters(list(backbone.parameters())):
            if rank == 0:
                state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
                torch.save(state, run_dir / REFERENCE)
    finish_and_exit()


def _train(world_size: int, jobs: list, out: Path) -> None:
    mp.spawn(
        _train_main,
        args=(world_size, free_port(), jobs, str(out)),
        nprocs=world_size,
        join=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_shards) -> Path:
    """Run dirs (2 steps each, each with the student backbone's final weights in REFERENCE).

    The student's consolidation paths: the fp32 module copy (dino_z0, dino_swin_z2), zero_to_fp32
    under bf16 ZeRO-2 (mae_swin_z2_bf16) and ZeRO-3 (mae_z3, 2 ranks), and DeepSpeed's BF16
    optimizer under bf16 ZeRO-1, its partitions joined here by name (mae_z1_bf16, 2 ranks).
    """
    root = tmp_path_factory.mktemp("export")
    shards = image_shards(classes=2, shard_size=8)
    common = [
        f"data.train.shards={shards}",
        "data.workers=0",
        "train.steps=2",
        "train.batch_size=4",
        "checkpoint.every_steps=2",
        "log.tensorboard=false",
    ]
    swin = ["model.backbone=swin_tiny", SWIN]
    bf16 = "train.precision=bf16"
    one_rank = [
        ("dino_z0", "dino_tiny.yaml", [*common, "deepspeed.zero_stage=0"]),
        ("dino_swin_z2", "dino_tiny.yaml", [*common, "deepspeed.zero_stage=2", *swin]),
        (
            "mae_swin_z2_bf16",
            "mae_tiny.yaml",
            # 64-pixel crops: a 32-pixel one holds a single 32-pixel mask unit.
            [*common, "deepspeed.zero_stage=2", bf16, *swin, "data.crops.mae_size=64"],
        ),
    ]
    two_ranks = [
        ("mae_z1_bf16", "mae_tiny.yaml", [*common, "deepspeed.zero_stage=1", bf16]),
        ("mae_z3", "mae_tiny.yaml", [*common, "deepspeed.zero_stage=3"]),
    ]
    _train(1, one_rank, root)
    _train(2, two_ranks, root)
    return root


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


def _reference_backbone(run_dir: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = load_recipe(run_dir / "config.yaml").model
    backbone = build_backbone(model.backbone, **model.overrides)
    backbone.load_state_dict(state, strict=True)
    return backbone


def _teacher_backbone_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The teacher's backbone, through the DINO teacher module itself (strict, head included)."""
    from pipeline.train.engine import build_method

    _, teacher = build_method(load_recipe(run_dir / "config.yaml"))
    tag = run_dir / "checkpoints" / (run_dir / "checkpoints" / "committed").read_text().strip()
    teacher.load_state_dict(torch.load(tag / "shared-teacher.pt", weights_only=True), strict=True)
    return teacher.backbone.state_dict()


def _check_fp32_masters(weights: dict, bf16_module: dict) -> None:
    """Exported fp32 weights are DeepSpeed's master copy of the engine's bf16 module weights."""
    assert set(weights) == set(bf16_module)
    for key, value in bf16_module.items():
        assert weights[key].dtype == torch.float32
        if value.dtype == torch.bfloat16:
            assert torch.equal(weights[key].to(torch.bfloat16), value), key
    # fp32 masters, not the bf16 copy upcast: some values are not representable in bf16.
    assert any(not torch.equal(w, w.to(torch.bfloat16).float()) for w in weights.values())


def _timm_vit_keys(depth: int) -> set[str]:
    """timm's `VisionTransformer(num_classes=0)` state-dict names (class token, no fc_norm)."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return keys | {"norm.weight", "norm.bias"}


@pytest.mark.slow
def test_dino_teacher_and_student_export_vit(runs: Path, tmp_path: Path) -> None:
    run_dir = runs / "dino_z0"
    out = export_backbone(run_dir, tmp_path / "teacher.safetensors")  # DINO default: teacher
    config = json.loads((tmp_path / "teacher.json").read_text())
    assert config["backbone"] == "vit_tiny_patch8" and config["which"] == "teacher"
    assert config["kwargs"] == {"embed_dim": 64, "depth": 4, "num_heads": 4}
    assert config["step"] == 2 and config["source"].endswith("step-00000002")
    weights = load_file(out)
    assert set(weights) == _timm_vit_keys(4)
    assert all(t.dtype == torch.float32 for t in weights.values())
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == config

    teacher = _teacher_backbone_state(run_dir)
    assert all(torch.equal(weights[k], v) for k, v in teacher.items())
    assert torch.equal(
        _outputs(load_exported(out)), _outputs(_reference_backbone(run_dir, teacher))
    )

    # The student, from a tag directory given directly.
    tag = run_dir / "checkpoints" / "step-00000002"
    out = export_backbone(tag, tmp_path / "student.safetensors", which="student")
    reference = torch.load(run_dir / REFERENCE)
    exported = load_exported(out)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in reference.items())
    assert torch.equal(_outputs(exported), _outputs(_reference_backbone(run_dir, reference)))
    # Two steps of EMA at momentum ~0.996: teacher and student differ.
    assert not torch.equal(
        weights["blocks.0.attn.qkv.weight"], reference["blocks.0.attn.qkv.weight"]
    )


@pytest.mark.slow
def test_swin_exports_keep_timm_names(runs: Path, tmp_path: Path) -> None:
    run_dir = runs / "dino_swin_z2"
    out = export_backbone(run_dir, tmp_path / "swin.safetensors", which="teacher")
    weights = load_file(out)
    for name in [
        "patch_embed.proj.weight",
        "patch_embed.norm.weight",
        "layers.1.downsample.reduction.weight",
        "layers.2.blocks.1.attn.relative_position_bias_table",
        "layers.2.blocks.1.mlp.fc2.bias",
        "norm.weight",
    ]:
        assert name in weights, name
    assert not any(k.startswith(("head.", "backbone.")) for k in weights)
    teacher = _teacher_backbone_state(run_dir)
    assert torch.equal(
        _outputs(load_exported(out)), _outputs(_reference_backbone(run_dir, teacher))
    )
    out = export_backbone(run_dir, tmp_path / "swin-student.safetensors", which="student")
    reference = torch.load(run_dir / REFERENCE)
    assert torch.equal(
        _outputs(load_exported(out)), _outputs(_reference_backbone(run_dir, reference))
    )

    # MAE on Swin, bf16 ZeRO-2: DeepSpeed's fp32 masters of the encoder, whose own mask token
    # (SimMIM style, part of the backbone) stays; the decoder goes.
    run_dir = runs / "mae_swin_z2_bf16"
    out = export_backbone(run_dir, tmp_path / "mae-swin.safetensors")
    weights = load_file(out)
    assert "mask_token" in weights and not any("decoder" in k for k in weights)
    _check_fp32_masters(weights, torch.load(run_dir / REFERENCE))
    load_exported(out)


@pytest.mark.slow
def test_mae_bf16_zero1_exports_fp32_master_weights(runs: Path, tmp_path: Path) -> None:
    run_dir = runs / "mae_z1_bf16"
    out = export_backbone(run_dir, tmp_path / "mae.safetensors")  # MAE default: student
    config = json.loads((tmp_path / "mae.json").read_text())
    assert (config["which"], config["zero_stage"], config["world_size"]) == ("student", 1, 2)
    weights = load_file(out)
    assert set(weights) == _timm_vit_keys(4)  # no decoder, no mask token
    _check_fp32_masters(weights, torch.load(run_dir / REFERENCE))
    load_exported(out)
    with pytest.raises(ExportError, match="without a teacher"):
        export_backbone(run_dir, tmp_path / "t.safetensors", which="teacher")


@pytest.mark.slow
def test_mae_zero3_export_matches_gathered_student(runs: Path, tmp_path: Path) -> None:
    run_dir = runs / "mae_z3"
    export_backbone(run_dir / "checkpoints", tmp_path / "mae3.safetensors")
    assert json.loads((tmp_path / "mae3.json").read_text())["zero_stage"] == 3
    reference = torch.load(run_dir / REFERENCE)
    exported = load_exported(tmp_path / "mae3.json")  # the JSON path works as well
    assert set(exported.state_dict()) == set(reference)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in reference.items())
    assert torch.equal(_outputs(exported), _outputs(_reference_backbone(run_dir, reference)))


def test_clear_errors_without_a_checkpoint(tmp_path: Path) -> None:
    from pipeline.config import save_recipe

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000004").mkdir(parents=True)  # never committed
    save_recipe(load_recipe(RECIPES / "mae_tiny.yaml"), run_dir / "config.yaml")
    with pytest.raises(ExportError, match=r"no committed checkpoint under .*checkpoints"):
        export_backbone(run_dir, tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match=r"step-00000004 is not a complete, committed"):
        export_backbone(run_dir / "checkpoints" / "step-00000004", tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match="does not exist"):
        export_backbone(tmp_path / "nowhere", tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match=r"must end in \.safetensors"):
        export_backbone(run_dir, tmp_path / "x.pt")


def test_cli_reports_errors_with_the_path(tmp_path: Path, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "export_cli", Path(__file__).resolve().parents[2] / "tools" / "export.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    (tmp_path / "run").mkdir()
    assert cli.main([str(tmp_path / "run"), str(tmp_path / "x.safetensors")]) == 2
    assert f"no committed checkpoint under {tmp_path / 'run'}" in capsys.readouterr().err

"""The CUDA tier: what only a GPU can show. Every test here is marked `cuda` and skipped where
torch sees no GPU; `tools/gpu_check.sh` runs them on a lent machine.

- MAE and DINO on ViT, Swin and Twins, bf16, ZeRO-2 and ZeRO-3, 20 steps: finite losses, and
  MAE's falls;
- the fused attention kernels really run: flash or memory-efficient SDPA for ViT's unmasked
  attention in bf16, memory-efficient for Swin's and Twins' masked windows (the math kernel is
  refused inside the test);
- the device-side colour augmentation on CUDA equals its CPU result on the same draws;
- a resume on the GPU continues with the uninterrupted run's losses (within bf16 tolerance).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.config import load_recipe

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "debug"
SMALL = {
    "vit": ["model.backbone=vit_tiny_patch8"],
    "swin": ["model.backbone=swin_tiny", "data.crops.global_size=64",
             "data.crops.local_size=32", "data.crops.mae_size=64",
             "model.overrides={embed_dim: 32, depths: [1, 1, 2, 1], num_heads: [1, 2, 2, 4]}"],
    "twins": ["model.backbone=twins_svt_small", "data.crops.global_size=64",
              "data.crops.local_size=32", "data.crops.mae_size=64",
              "model.overrides={dims: [32, 64, 64, 128], depths: [1, 1, 1, 1], "
              "heads: [1, 2, 2, 4]}"],
}  # fmt: skip


def pretrain_one_gpu(recipe_file: str, overrides: list[str], run_dir: Path) -> list[dict]:
    """`pretrain` as rank 0 of 1 on this process's GPU (NCCL); the metrics it logged."""
    from pipeline.train.distributed import DistEnv, free_port
    from pipeline.train.engine import pretrain

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    recipe = load_recipe(RECIPES / recipe_file, overrides)
    pretrain(recipe, DistEnv(0, 0, 1), run_dir, progress=False)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(image_shards) -> str:
    return image_shards(classes=4, per_class=16, size=(96, 80), shard_size=16)


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("method", ["mae", "dino"])
def test_methods_train_in_bf16_under_zero(shards, tmp_path, method, family, zero):
    common = [f"data.train.shards={shards}", "data.workers=2", "train.steps=20",
              "train.batch_size=16", "train.precision=bf16", f"deepspeed.zero_stage={zero}",
              "checkpoint.every_steps=100", "log.every_steps=1",
              "log.tensorboard=false"]  # fmt: skip
    rows = pretrain_one_gpu(f"{method}_tiny.yaml", [*common, *SMALL[family]], tmp_path / "run")
    losses = torch.tensor([r["loss"] for r in rows])
    assert len(rows) == 20 and torch.isfinite(losses).all()
    if method == "mae":
        assert losses[-5:].mean() < losses[:5].mean()
    assert rows[-1]["mem_gb"] > 0  # the CUDA allocator's peak, so the GPU really did the work


def test_sdpa_runs_a_fused_kernel_for_every_backbone():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.models import build_backbone

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for name, size, overrides in [
        ("vit_small_patch16", 224, {}),
        ("swin_tiny", 224, {}),
        ("twins_svt_small", 224, {}),
    ]:
        model = build_backbone(name, **overrides).cuda().to(torch.bfloat16)
        x = torch.randn(2, 3, size, size, device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel(fused), torch.no_grad():  # raises if only the math kernel would do
            model.forward_features(x)


def test_device_augmentation_on_cuda_equals_cpu():
    from pipeline.config_schema import ColorConfig
    from pipeline.data.transforms import DeviceAugment

    augment = DeviceAugment(ColorConfig(), num_global=2)
    g = torch.Generator().manual_seed(0)
    views = [torch.randint(0, 256, (8, 3, s, s), generator=g, dtype=torch.uint8)
             for s in (64, 64, 32, 32)]  # fmt: skip
    cpu = augment(views, torch.Generator().manual_seed(1))
    gpu = augment([v.cuda() for v in views], torch.Generator().manual_seed(1))
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=2e-3)


def test_resume_on_the_gpu_continues_the_losses(shards, tmp_path):
    common = [f"data.train.shards={shards}", "data.workers=2", "train.batch_size=16",
              "train.precision=bf16", "deepspeed.zero_stage=2", "log.every_steps=1",
              "log.tensorboard=false", "checkpoint.every_steps=5"]  # fmt: skip
    whole = pretrain_one_gpu("dino_tiny.yaml", [*common, "train.steps=10"], tmp_path / "whole")
    pretrain_one_gpu("dino_tiny.yaml", [*common, "train.steps=5"], tmp_path / "cut")
    resumed = pretrain_one_gpu("dino_tiny.yaml", [*common, "train.steps=10"], tmp_path / "cut")
    got = [r["loss"] for r in resumed if r["step"] > 5]
    want = [r["loss"] for r in whole if r["step"] > 5]
    # Same data, same seeds, same kernels: equal up to non-deterministic bf16 reductions.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=2e-3)

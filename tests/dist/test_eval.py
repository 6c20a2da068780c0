"""Evaluation stages on real shards: k-NN, linear probe and fine-tune on 2 gloo processes.

One process group (spawned once per module) runs the whole story, the way the stage runner does:
a process group that already exists, then k-NN, the linear probe and a fine-tune on an easy task;
then one-epoch fine-tunes under ZeRO-0 and ZeRO-2. The tests compare what it left behind with
one-process runs. (Fine-tunes killed mid-way and resumed: tests/dist/test_resume.py.)

The task: 4 classes of 40x40 images, each a smooth random colour field with 16 small squares of
the class colour. A frozen random ViT blurs the squares into its tokens; fine-tuning learns them.
A few fast single-process tests of the fine-tune parts sit at the top.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from pipeline.config import Recipe, load_recipe
from pipeline.data.shards import write_shards
from pipeline.eval.features import FeatureSet, cached_features, make_accelerator
from pipeline.methods.classifier import layer_ids, mix_batch, soft_targets
from pipeline.models import build_backbone
from pipeline.train.distributed import finish_and_exit, free_port, rank_environ
from pipeline.train.objectives import param_groups

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "debug" / "mae_tiny.yaml"
COLOURS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=np.float32)
MODEL = "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}"
# Short fine-tunes: 8 steps per epoch on 2 ranks.
SHORT = [
    "eval.finetune.epochs=2",
    "eval.finetune.batch_size=16",
    "eval.finetune.lr=0.1",
    "eval.finetune.warmup_epochs=0.5",
    "eval.finetune.layer_decay=0.75",
    "eval.finetune.drop_path=0.1",
    "checkpoint.every_steps=5",
]


# --------------------------------------------------------------------------- single process


def test_layer_ids_follow_the_forward_order_of_every_family():
    torch.set_num_threads(1)
    vit = build_backbone("vit_tiny_patch8", embed_dim=32, depth=3, num_heads=2, num_classes=4)
    ids, blocks = layer_ids(vit, (16, 16))
    assert blocks == 3
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert [ids[f"blocks.{i}.attn.qkv.weight"] for i in range(3)] == [1, 2, 3]
    assert ids["norm.weight"] == ids["head.weight"] == 4
    swin = build_backbone(
        "swin_tiny", embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), num_classes=4
    )
    ids, blocks = layer_ids(swin, (32, 32))
    assert blocks == 5
    assert ids["patch_embed.proj.weight"] == 0
    assert ids["layers.2.blocks.1.attn.qkv.weight"] == 4
    assert ids["layers.3.downsample.reduction.weight"] == 5  # runs before the last block
    assert ids["head.fc.weight"] == 6
    twins = build_backbone(
        "twins_svt_small", dims=(16, 32, 32, 64), depths=(2, 1, 2, 1), heads=(1, 2, 2, 4)
    )
    ids, blocks = layer_ids(twins, (32, 32))
    # Registration order puts every stage's patch embedding first; the forward order does not.
    assert ids["patch_embeds.0.proj.weight"] == 0 and ids["patch_embeds.1.proj.weight"] == 3
    assert ids["blocks.3.0.mlp.fc1.weight"] == 6 and ids["norm.weight"] == 7
    ids, blocks = layer_ids(vit, (16, 16))
    groups = param_groups(vit, 0.05, ids, lambda i: 0.5 ** (blocks + 1 - i))
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["head.weight"]["weight_decay"]
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5**3
    assert (
        by_name["pos_embed"]["weight_decay"] == 0.0 and by_name["pos_embed"]["lr_scale"] == 0.5**4
    )


def test_mixup_cutmix_and_label_smoothing_keep_targets_distributions():
    targets = soft_targets(torch.tensor([0, 2, 1]), 4, 0.1)
    torch.testing.assert_close(targets.sum(1), torch.ones(3))
    assert targets[0, 0] == pytest.approx(0.925) and targets[0, 1] == pytest.approx(0.025)
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 8, 8).contiguous()
    mixed, t = mix_batch(images, targets, np.random.default_rng(0), mixup=0.8, cutmix=0.0)
    lam = float(mixed[0, 0, 0, 0] / 2)  # image 0 (zeros) mixed with image 2 (twos)
    torch.testing.assert_close(mixed[0], torch.full((3, 8, 8), 2 * lam))
    torch.testing.assert_close(t, targets * (1 - lam) + targets.flip(0) * lam)
    for seed in range(5):
        cut, t = mix_batch(images, targets, np.random.default_rng(seed), mixup=0.0, cutmix=1.0)
        pasted = float((cut[0] == 2).float().mean())  # the share of image 0 now from image 2
        torch.testing.assert_close(t[0], targets[0] * (1 - pasted) + targets[2] * pasted)
    same, t = mix_batch(images, targets, np.random.default_rng(0), mixup=0.0, cutmix=0.0)
    assert same is images and t is targets


# --------------------------------------------------------------------------- 2 processes


def _image(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    field = rng.uniform(0.1, 0.9, (5, 5, 3))
    img = Image.fromarray((field * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32) / 255
    for _ in range(16):
        y, x = rng.integers(0, size - 3, 2)
        pixels[y : y + 3, x : x + 3] = COLOURS[label]
    return Image.fromarray((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval-data")
    rng = np.random.default_rng(0)
    out = {}
    for split, per_class in (("train", 64), ("val", 32)):
        for label in range(4):
            folder = root / "src" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                _image(label, rng).save(folder / f"{i}.png")
        write_shards(root / "src" / split, root / split, shard_size=24, progress=False)
        out[split] = str(root / split)
    return out


def recipe(shards: dict[str, str], *extra: str) -> Recipe:
    overrides = [
        f"data.train.shards={shards['train']}",
        f"data.val.shards={shards['val']}",
        "data.workers=0",
        MODEL,
        "deepspeed.zero_stage=0",
        "eval.batch_size=32",
        "eval.knn.k=[1,5,20]",
        "eval.linear.epochs=20",
        "eval.linear.lrs=[0.01,0.1,1.0]",
        "eval.linear.few_shot=[4]",
        "stages=[pretrain,knn,linear,finetune]",
        *extra,
    ]
    return load_recipe(RECIPE, overrides)


def backbone_for(r: Recipe) -> torch.nn.Module:
    """A fixed random backbone: the same weights in every process."""
    torch.manual_seed(0)
    return build_backbone(r.model.backbone, **r.model.overrides)


def _rank_main(rank: int, world_size: int, port: int, shards: dict[str, str], out: str) -> None:
    os.environ.update(rank_environ(rank, world_size, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pipeline.eval.finetune import finetune, finetune_stage
    from pipeline.eval.knn import knn_stage
    from pipeline.eval.linear import linear_stage

    dist.init_process_group("gloo")  # as after pretraining: accelerate must join this group
    out_dir = Path(out)
    r = recipe(shards)
    results = {"world_size": dist.get_world_size()}
    results.update(knn_stage(r, backbone_for(r), out_dir / "run"))
    results.update(linear_stage(r, backbone_for(r), out_dir / "run"))
    easy = recipe(
        shards,
        "eval.finetune.epochs=20",
        "eval.finetune.batch_size=16",
        "eval.finetune.lr=0.2",
        "checkpoint.every_steps=1000",
    )
    results.update(finetune_stage(easy, backbone_for(easy), out_dir / "run"))

    one_epoch = recipe(shards, *SHORT, "eval.finetune.epochs=1")
    results["zero0"] = finetune(one_epoch, backbone_for(one_epoch), out_dir / "zero0")
    zero2 = recipe(shards, *SHORT, "deepspeed.zero_stage=2", "eval.finetune.epochs=1")
    results["zero2"] = finetune(zero2, backbone_for(zero2), out_dir / "zero2")
    if rank == 0:
        (out_dir / "results.json").write_text(json.dumps(results))
    finish_and_exit()


@pytest.fixture(scope="module")
def story(shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval-story")
    mp.spawn(_rank_main, args=(2, free_port(), shards, str(out)), nprocs=2, join=True)
    return out, json.loads((out / "results.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_two_process_features_match_one_process(story, shards, tmp_path):
    out, results = story
    assert results["world_size"] == 2  # accelerate joined the existing 2-rank group
    r = recipe(shards)
    torch.set_num_threads(1)
    for split in ("train", "val"):
        two = FeatureSet(**torch.load(out / "run" / "features" / f"{split}.pt"))
        one = cached_features(r, backbone_for(r), tmp_path, split, make_accelerator())
        total = 256 if split == "train" else 128
        assert one.ids.tolist() == two.ids.tolist() == list(range(total))
        assert torch.equal(one.labels, two.labels)
        torch.testing.assert_close(one.pooled, two.pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one.avg, two.avg, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one.cls.float(), two.cls.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_knn_and_linear_probe_report_every_figure(story):
    out, results = story
    for k in (1, 5, 20):
        assert 25 < results[f"knn_top1_k{k}"] <= results[f"knn_top5_k{k}"] <= 100
    assert results["knn_top1"] == results["knn_top1_k20"]
    heads = results["linear_heads"]
    assert len(heads) == 4 * 3  # cls1, cls1+avg, cls2, cls2+avg x 3 lrs
    best = results["linear_best_head"]
    assert heads[best]["val_top1"] == max(h["val_top1"] for h in heads.values())
    assert results["linear_top1"] == heads[best]["test_top1"]
    assert "linear_top1_4shot" in results and len(results["linear_heads_4shot"]) == 12
    assert (out / "run" / "linear_metrics.jsonl").is_file()


@pytest.mark.slow
def test_finetune_beats_the_linear_probe(story):
    _, results = story
    assert results["finetune_top1"] > results["linear_top1"] + 5, results


@pytest.mark.slow
def test_finetune_under_zero2_matches_zero0(story):
    out, results = story
    assert results["zero2"]["step"] == results["zero0"]["step"] == 8
    zero0, zero2 = metrics(out / "zero0"), metrics(out / "zero2")
    assert [m["step"] for m in zero0] == [m["step"] for m in zero2]
    assert "val_top1" in zero0[-1] and "val_top1" in zero2[-1]  # scored at the epoch's end
    for a, b in zip(zero0, zero2, strict=True):
        assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), abs=1e-5)
    # One checkpoint format for pretraining and fine-tuning: DeepSpeed's files and a commit.
    tag = out / "zero2" / "finetune" / "checkpoints" / "step-00000008"
    assert (tag / "commit.json").is_file() and (tag / "rank-00001.pt").is_file()
    assert (out / "zero2" / "finetune" / "param_groups.txt").is_file()

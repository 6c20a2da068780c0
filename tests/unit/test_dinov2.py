"""DINOv2's parts of the DINO objective: Sinkhorn-Knopp centring, iBOT, registers.

The two formulas are checked against transcriptions of the published code (DINOv2's
`sinkhorn_knopp_teacher` and `iBOTPatchLoss.forward_masked`), written out below line by line.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DinoConfig, RecipeError, load_recipe
from pipeline.data.packing import pack_images
from pipeline.methods.dino import (
    DINO,
    block_mask,
    ema_parameters,
    ibot_loss,
    ibot_masks,
    make_teacher,
    sinkhorn_knopp,
)
from pipeline.models.vit import VisionTransformer
from pipeline.train.objectives import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


# Transcriptions of the published formulas -----------------------------------------------------


def sinkhorn_knopp_reference(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2's `DINOLoss.sinkhorn_knopp_teacher` on one process (no all-reduce)."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()  # K x B
    B = Q.shape[1]
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def ibot_reference(student_patch_tokens_masked, teacher_patch_tokens_masked, masks, temp):
    """DINOv2's `iBOTPatchLoss.forward_masked` (masks_weight computed there), times its
    `loss_scales * ibot_loss_scale` = 2 * 1/2 for two global crops."""
    t = teacher_patch_tokens_masked
    s = student_patch_tokens_masked
    loss = torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    loss = loss * masks_weight
    return (-loss.sum() / masks.shape[0]) * 2 * (1.0 / 2)


def fixed_logits(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))


def fixed_masks() -> torch.Tensor:
    """6 samples x 9 patches: two unmasked samples, the others with 1 to 5 masked patches."""
    masks = torch.zeros(6, 9, dtype=torch.bool)
    masks[0, [1, 4]] = True
    masks[2, [0]] = True
    masks[3, [2, 3, 5, 7, 8]] = True
    masks[5, [6, 8, 0]] = True
    return masks


# Sinkhorn-Knopp --------------------------------------------------------------------------------


def test_sinkhorn_knopp_equals_the_published_formula():
    logits = fixed_logits(12, 7)
    for temp in (0.04, 0.07, 1.0):
        ref = sinkhorn_knopp_reference(logits.clone(), temp)
        torch.testing.assert_close(sinkhorn_knopp(logits, temp), ref, rtol=0, atol=1e-6)
        # An assignment: each sample's row sums to 1.
        torch.testing.assert_close(ref.sum(1), torch.ones(12), rtol=0, atol=1e-6)


def _simulated_all_reduce(ranks: int):
    """A sum over `ranks` threads, each calling in the same order: a lock-step collective."""
    barrier = threading.Barrier(ranks)
    slots: list[torch.Tensor | None] = [None] * ranks

    def make(rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()  # everyone has read before the next call overwrites
            t.copy_(total)
            return t

        return all_reduce

    return make


def test_sinkhorn_knopp_over_ranks_with_unequal_batches_equals_one_process():
    logits = fixed_logits(10, 6, seed=1)
    parts = [logits[:7], logits[7:]]  # bucketed batches: ranks hold different sample counts
    make = _simulated_all_reduce(2)
    out: list[torch.Tensor | None] = [None, None]

    def run(rank: int) -> None:
        out[rank] = sinkhorn_knopp(parts[rank], 0.07, make(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ref = sinkhorn_knopp_reference(logits.clone(), 0.07)
    torch.testing.assert_close(torch.cat(out), ref, rtol=0, atol=1e-6)


# iBOT ------------------------------------------------------------------------------------------


def test_ibot_loss_equals_the_published_formula():
    masks = fixed_masks()
    m = int(masks.sum())
    student = fixed_logits(m, 8, seed=2) * 3
    teacher = F.softmax(fixed_logits(m, 8, seed=3) / 0.07, dim=-1)
    got = ibot_loss(student, teacher, masks, 0.1)
    ref = ibot_reference(student, teacher, masks, 0.1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # Read another way: each masked sample's mean cross-entropy, summed, over all 6 samples.
    ce = -(teacher * F.log_softmax(student / 0.1, -1)).sum(-1)
    per_sample = [c.mean() for c in ce.split(masks.sum(-1).tolist()) if len(c)]
    torch.testing.assert_close(got, sum(per_sample) / 6, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", ["block", "random"])
def test_ibot_masks_count_as_dinov2_and_repeat_with_the_generator(shape):
    samples, grid, patches = 10, (7, 7), 49
    masks = ibot_masks(
        samples, grid, (0.1, 0.5), 0.5, torch.Generator().manual_seed(0), shape=shape
    )
    assert masks.shape == (samples, patches) and masks.dtype == torch.bool
    assert masks.device == torch.device("cpu")
    counts = masks.sum(-1)
    assert int((counts > 0).sum()) == 5  # int(10 x 0.5) samples masked, the rest not
    # Stratified: the i-th masked sample's ratio lies in the i-th fifth of [0.1, 0.5]. Blocks
    # never exceed the target, and may fall short of it (the lower bound holds for this seed).
    bounds = torch.linspace(0.1, 0.5, 6)
    got = sorted(counts[counts > 0].tolist())
    for i, c in enumerate(got):
        assert int(patches * bounds[i]) <= c <= int(patches * bounds[i + 1])
    again = ibot_masks(
        samples, grid, (0.1, 0.5), 0.5, torch.Generator().manual_seed(0), shape=shape
    )
    assert torch.equal(masks, again)
    other = ibot_masks(
        samples, grid, (0.1, 0.5), 0.5, torch.Generator().manual_seed(1), shape=shape
    )
    assert not torch.equal(masks, other)
    assert not ibot_masks(4, (3, 3), (0.1, 0.5), 0.0, torch.Generator(), shape=shape).any()


def test_block_masks_stay_within_each_samples_target_and_mask_nothing_else():
    # The targets, drawn as `shape="random"` draws them (same generator calls), are exact there.
    samples, grid = 64, (14, 14)
    g = torch.Generator().manual_seed(3)
    targets = ibot_masks(samples, grid, (0.1, 0.5), 0.5, g, shape="random").sum(-1)
    blocks = ibot_masks(samples, grid, (0.1, 0.5), 0.5, torch.Generator().manual_seed(3))
    counts = blocks.sum(-1)
    assert torch.equal(counts > 0, targets > 0)  # the same samples masked; the others untouched
    assert bool((counts <= targets).all())  # never more than the target
    # Short by at most a few patches: blocks rarely fit the last few exactly.
    assert int(counts.sum()) >= 0.95 * int(targets.sum())
    assert bool((counts[targets > 0] >= 4).all())


def test_block_mask_masks_in_place_up_to_its_target():
    rng = np.random.default_rng(0)
    for target in [1, 3, 4, 20, 98]:
        mask = np.zeros((14, 14), dtype=bool)
        mask[0, :5] = True  # masked already: kept, and not counted
        got = block_mask(mask, target, rng)
        assert 0 <= got <= target and int(mask.sum()) == 5 + got and mask[0, :5].all()


def masked_neighbours(masks: torch.Tensor, rows: int, cols: int) -> float:
    """Mean number of masked 4-neighbours per masked patch."""
    m = masks.view(-1, rows, cols).float()
    padded = F.pad(m, (1, 1, 1, 1))
    neighbours = (
        padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    )
    return float((neighbours * m).sum() / m.sum())


def test_block_masks_are_rectangles_where_random_masks_are_scattered():
    # Blocks: most masked patches sit inside a rectangle, with 3-4 masked neighbours; uniform
    # patches at ratios 0.1-0.5 have ~4 x 0.3 of them.
    args = (64, (14, 14), (0.1, 0.5), 0.5)
    blocks = ibot_masks(*args, torch.Generator().manual_seed(0), shape="block")
    scattered = ibot_masks(*args, torch.Generator().manual_seed(0), shape="random")
    assert masked_neighbours(blocks, 14, 14) > 2.5
    assert masked_neighbours(scattered, 14, 14) < 1.8
    # And a 2x2 square fully masked in every masked sample.
    m = blocks.view(-1, 14, 14)
    squares = m[:, :-1, :-1] & m[:, 1:, :-1] & m[:, :-1, 1:] & m[:, 1:, 1:]
    assert torch.equal(squares.flatten(1).any(-1), m.flatten(1).any(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("shape", ["block", "random"])
def test_ibot_masks_on_the_generators_device(shape):
    g = torch.Generator("cuda").manual_seed(0)
    masks = ibot_masks(8, (16, 16), (0.1, 0.5), 0.5, g, shape=shape)
    assert masks.device.type == "cuda" and masks.dtype == torch.bool
    again = ibot_masks(
        8, (16, 16), (0.1, 0.5), 0.5, torch.Generator("cuda").manual_seed(0), shape=shape
    )
    assert torch.equal(masks, again)


def tiny_cfg(**overrides: object) -> DinoConfig:
    base = dict(out_dim=32, hidden_dim=24, bottleneck_dim=8, ibot_weight=1.0)
    return DinoConfig(**{**base, **overrides})


def tiny_vit(**kw) -> VisionTransformer:
    return VisionTransformer(
        **{"embed_dim": 16, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32, **kw}
    )


def tiny_dino(seed: int = 0, registers: int = 0, **overrides: object) -> DINO:
    torch.manual_seed(seed)
    return DINO(tiny_vit(num_registers=registers), tiny_cfg(**overrides))


def views(batch: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)
    ]


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_ibot_in_the_dino_loss_equals_its_parts_by_hand(separate, centering):
    student = tiny_dino(registers=2, ibot_separate_head=separate, centering=centering)
    with torch.no_grad():
        student.mask_token.normal_()  # not zero, so that masking visibly changes the input
        student.criterion.center.normal_()
        if centering == "center":
            student.criterion.ibot_center.normal_()
    teacher = make_teacher(student)
    v = views()
    masks = list(ibot_masks(6, (4, 4), (0.1, 0.5), 0.5, torch.Generator().manual_seed(1)).split(3))
    teacher_out, teacher_patches = teacher(v[:2], masks)
    out = student(v, teacher_out, 0.05, masks=masks, teacher_patches=teacher_patches)

    # By hand: the backbone's tokens, the mask token where masked, the head(s), the formulas.
    bb, p = student.backbone, student.backbone.num_prefix_tokens
    ihead = student.ibot_head if separate else student.head
    x = torch.cat(v[:2])
    m = torch.cat(masks)
    t_tokens = teacher.backbone.forward_features(x)[:, p:]
    t_patch = (teacher.ibot_head if separate else teacher.head)(t_tokens[m])
    torch.testing.assert_close(teacher_patches, t_patch)
    s_tokens = bb.forward_features(x, masks=m, mask_token=student.mask_token)[:, p:]
    s_patch = ihead(s_tokens[m])
    if centering == "center":
        targets = F.softmax((t_patch - student.criterion.ibot_center) / 0.05, -1)
    else:
        targets = sinkhorn_knopp_reference(t_patch.clone(), 0.05)
    ibot = ibot_reference(s_patch, targets, m, student.criterion.student_temp)
    torch.testing.assert_close(out["logs"]["ibot"], ibot, rtol=1e-5, atol=1e-6)
    # The DINO part sees the student's global crops masked, as DINOv2's student does.
    s_feats = bb.forward_features(x, masks=m, mask_token=student.mask_token)
    s_global = student.head(torch.cat([bb.pool(s_feats), *(bb(u) for u in v[2:])]))
    dino = student.criterion(list(s_global.split(3)), teacher_out, 0.05)["loss"]
    torch.testing.assert_close(out["logs"]["loss"], dino, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], dino + ibot, rtol=1e-5, atol=1e-6)

    out["loss"].backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0
    if separate:
        assert student.ibot_head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0


def test_masked_patches_enter_the_blocks_as_the_mask_token():
    vit = tiny_vit(num_registers=1)
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5]] = True
    token = torch.randn(1, 16)
    plain, masked = vit.embed(x), vit.embed(x, masks, token)
    pos = vit.patch_pos_embed(4, 4)
    torch.testing.assert_close(masked[masks], (token + pos[[0, 5]]))
    torch.testing.assert_close(masked[~masks], plain[~masks])


def test_ibot_parts_join_the_teacher_ema_groups_and_no_decay_names():
    student = tiny_dino(ibot_separate_head=True)
    teacher = make_teacher(student)
    t, _ = ema_parameters(teacher, student)
    names = [n for n, _ in teacher.named_parameters()]
    assert any(n.startswith("ibot_head.") for n in names) and "mask_token" not in names
    assert len(t) == len(names)
    no_decay = student.no_weight_decay()
    assert "mask_token" in no_decay and "ibot_head.mlp.0.bias" in no_decay
    assert "ibot_head.mlp.0.weight" not in no_decay
    groups = {g["group_name"]: g["names"] for g in param_groups(student, 0.04)}
    assert any(n.startswith("ibot_head.last_layer") for n in groups["last_layer_decay"])


def test_defaults_build_plain_dino():
    student = tiny_dino(ibot_weight=0.0)
    assert student.mask_token is None and student.ibot_head is None
    assert "criterion.ibot_center" not in student.state_dict()
    assert not any("reg_token" in n for n, _ in student.named_parameters())


def test_center_update_of_the_patch_outputs():
    student = tiny_dino(center_momentum=0.5)
    patches = torch.arange(12.0).view(3, 4).repeat(1, 8)  # (3, 32)
    student.update_ibot_center(patches)
    torch.testing.assert_close(student.criterion.ibot_center, 0.5 * patches.mean(0, keepdim=True))


# Registers -------------------------------------------------------------------------------------


def test_registers_sit_after_the_class_token_without_position_and_get_gradients():
    vit = tiny_vit(num_registers=4)
    assert vit.num_prefix_tokens == 5 and vit.pos_embed.shape[1] == 1 + 16
    x = torch.randn(2, 3, 32, 32)
    feats = vit.forward_features(x)
    assert feats.shape == (2, 5 + 16, 16)
    pooled, patches = vit(x, patch_tokens=True)
    torch.testing.assert_close(pooled, feats[:, 0])
    torch.testing.assert_close(patches, feats[:, 5:])
    vit(x).sum().backward()
    assert vit.reg_token.grad.abs().sum() > 0
    assert "reg_token" in vit.no_weight_decay()
    mean = tiny_vit(num_registers=2, pool="mean", class_token=False)
    torch.testing.assert_close(mean(x), mean.forward_features(x)[:, 2:].mean(1))


@pytest.mark.parametrize("pool,class_token", [("cls", True), ("mean", False), ("map", True)])
def test_navit_packed_with_registers_equals_each_image_alone(pool, class_token):
    m = tiny_vit(pool=pool, class_token=class_token, num_registers=3).eval()
    sizes = [(32, 32), (16, 24), (8, 8), (24, 16)]
    gen = torch.Generator().manual_seed(2)
    images = [torch.randn(3, h, w, generator=gen) for h, w in sizes]
    batch = pack_images(images, patch_size=8, max_len=30, num_prefix_tokens=m.num_prefix_tokens)
    assert batch.patches.shape[0] >= 2, "the test must pack several images per row"
    tokens, pooled = m.forward_packed(batch)
    for i, img in enumerate(images):
        alone = m.forward_features(img[None])[0]
        torch.testing.assert_close(pooled[i], m.pool(alone[None])[0], atol=1e-5, rtol=0)
        row, slot = (batch.order == i).nonzero()[0].tolist()
        got = tokens[row][batch.image_ids[row] == slot]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


# Recipe checks -----------------------------------------------------------------------------------


def test_recipe_refuses_ibot_off_vit_or_packed_and_bad_ratios():
    dino = "recipes/debug/dino_tiny.yaml"
    with pytest.raises(RecipeError, match="not a ViT"):
        load_recipe(dino, ["method.dino.ibot_weight=1", "model.backbone=swin_tiny",
                           "data.crops.global_size=64", "data.crops.local_size=32",
                           "data.crops.mae_size=64", "data.eval_resize=64",
                           "data.eval_crop=64"])  # fmt: skip
    with pytest.raises(RecipeError, match="navit"):
        load_recipe(dino, ["method.dino.ibot_weight=1", "data.buckets.navit=true"])
    with pytest.raises(RecipeError, match="ibot_mask_ratio"):
        load_recipe(dino, ["method.dino.ibot_mask_ratio=[0.5, 0.1]"])
    with pytest.raises(RecipeError, match="centering"):
        load_recipe(dino, ["method.dino.centering=mean"])
    r = load_recipe("recipes/dinov2_vits14.yaml")
    assert r.method.dino.centering == "sinkhorn_knopp" and r.method.dino.ibot_weight == 1.0
    assert r.model.overrides["num_registers"] == 4

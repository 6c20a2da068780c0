"""A backbone with a classifier head, for fine-tuning: the model, its layers, and its targets.

- `build_classifier`: a fresh backbone of the recipe's kind with a head and the fine-tune's drop
  path, holding a pretrained backbone's weights;
- `layer_ids`: each parameter's layer (for layer-wise lr decay), found from one forward pass, so
  it holds for ViT, Swin and Twins alike;
- `soft_targets`, `mix_batch`, `soft_cross_entropy`: label smoothing, timm's batch-mode mixup /
  cutmix, and the loss on soft targets (torch ops on the device, draws from a numpy generator).

The training itself is the trainer's (`pipeline.train.objectives.ClassifierObjective`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Recipe
from pipeline.models import build_backbone

MIXUP_SWITCH = 0.5  # probability of cutmix instead of mixup when both are on (timm)
_BLOCK = re.compile(r"(^|\.)blocks(\.\d+)+$")


def build_classifier(recipe: Recipe, backbone: nn.Module, num_classes: int) -> nn.Module:
    """A fresh backbone of the recipe's kind with a classifier head and the fine-tune drop path,
    holding `backbone`'s weights (everything but the head)."""
    m = recipe.model
    model = build_backbone(
        m.backbone,
        num_classes=num_classes,
        drop_path_rate=recipe.eval.finetune.drop_path,
        grad_checkpointing=m.grad_checkpointing,
        **m.overrides,
    )
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(
            f"the backbone does not match model.backbone={m.backbone}: missing "
            f"{[k for k in missing if not k.startswith('head.')]}, unexpected {unexpected}"
        )
    return model


def _leaf_blocks(model: nn.Module) -> list[str]:
    """Names of transformer blocks: `...blocks.i` (ViT, Swin) or `blocks.s.i` (Twins)."""
    modules = dict(model.named_modules())
    return [
        name
        for name, module in modules.items()
        if _BLOCK.search(name)
        and not any(_BLOCK.search(f"{name}.{child}") for child in module._modules)
    ]


@torch.no_grad()
def layer_ids(model: nn.Module, image_hw: tuple[int, int]) -> tuple[dict[str, int], int]:
    """Each parameter's layer for lr decay, and the number of blocks L.

    Found from one forward pass, so it holds for every backbone family: block i (in the order
    blocks run) is layer i + 1; a parameter outside the blocks takes 0 when its module runs
    before the first block (patch embedding, tokens, position tables), else the layer of the
    next block to run (L + 1 after the last: final norm, head).
    """
    blocks = _leaf_blocks(model)
    modules = dict(model.named_modules())
    index: dict[str, int] = {}  # block name -> position in forward order
    seen: dict[str, int] = {}  # module name -> blocks finished when it first ran
    finished = [0]
    hooks = []

    def pre(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            seen.setdefault(name, finished[0])
            if name in blocks and name not in index:
                index[name] = len(index)

        return hook

    def post(module: nn.Module, args: Any, out: Any) -> None:
        finished[0] += 1

    for name, module in modules.items():
        hooks.append(module.register_forward_pre_hook(pre(name)))
        if name in blocks:
            hooks.append(module.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, *image_hw))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    count = len(index)
    ids = {}
    for pname, _ in model.named_parameters():
        owner = next((b for b in blocks if pname.startswith(b + ".")), None)
        if owner is not None and owner in index:
            ids[pname] = index[owner] + 1
            continue
        done = seen.get(pname.rpartition(".")[0], 0)
        ids[pname] = 0 if done == 0 else min(done, count) + 1
    return ids, count


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, C) float targets: 1 - smoothing + smoothing / C on the label."""
    off = smoothing / num_classes
    out = torch.full((len(labels), num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    rng: np.random.Generator,
    *,
    mixup: float,
    cutmix: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's batch-mode mixup / cutmix: each image is mixed with the batch flipped.

    images (B, 3, H, W) float, targets (B, C). mixup / cutmix are the Beta alphas (0 = off);
    with both on, cutmix is chosen with probability 0.5. Cutmix's lambda is corrected to the
    pasted box's actual area.
    """
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < MIXUP_SWITCH)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    other = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        images = images * lam + other * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits))."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

"""Model FLOPs per image: what model FLOPs utilisation (MFU) is measured against.

Counted are the FLOPs of matrix products, 2 per multiply-add: linear layers, convolutions, and
attention's two products. Norms, activations, softmax and other element-wise work are left out,
as in the usual MFU accounting (PaLM's appendix B, nanoGPT's `estimate_mfu`), and so are
recomputations (activation checkpointing does not raise the model's FLOPs).

ViT forward, per image of P patches of side p with C channels, N = P + prefix tokens (class
token, registers), width D, depth L, MLP width H:

    F_vit = 2·P·C·p²·D  +  L · (8·N·D² + 4·N·D·H + 4·N²·D)

(patch embedding; per block: q, k, v 6·N·D², output projection 2·N·D², MLP 4·N·D·H, attention
scores and weighted values 4·N²·D; at H = 4·D the block is 24·N·D² + 4·N²·D). `vit_forward_flops`
is this formula. A backward pass costs twice its forward (one product for each operand's
gradient), so training on an image costs 3x its forward.

Per pretraining step and image (`method_step_flops`):
- DINO: 3 x (student backbone + head on every crop) + teacher backbone + head on the global
  crops; for ViT-S/16 with 2x224 + 10x96 crops about 124 GFLOP (122 for the backbones alone).
- MAE: 3 x (encoder on the visible patches + decoder on all patches); ViT-B/16 at mask ratio
  0.75 (49 visible patches), 8-block 512-wide decoder: about 59 GFLOP.
Swin, Twins, the heads and the decoders are counted by tracing one forward with torch's
`FlopCounterMode` on the meta device (`traced_flops`: shapes only, no memory, no arithmetic);
the test suite checks the ViT formula against the same tracer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def vit_forward_flops(
    *, patches: int, prefix: int, dim: int, depth: int, mlp_hidden: int, patch: int, chans: int = 3
) -> int:
    """`F_vit` of the module docstring: one image's ViT forward, in FLOPs."""
    n = patches + prefix
    embed = 2 * patches * chans * patch * patch * dim
    block = 8 * n * dim * dim + 4 * n * dim * mlp_hidden + 4 * n * n * dim
    return embed + depth * block


def traced_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products `fn` runs (build modules and inputs on the meta device)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def method_step_flops(recipe: Any, batch: int = 1) -> float:
    """FLOPs per image of one pretraining step of `recipe`'s objective at its crop sizes
    (backward counted as 2x forward, plus DINO's teacher forward). Traced on the meta device,
    so any size of model costs nothing to count."""
    from pipeline.train.objectives import build_objective  # the modules as the trainer builds

    with torch.device("meta"):
        objective = build_objective(recipe)
    objective.student.train()
    return objective.step_flops(recipe.data.crops, batch) / batch


# Dense bf16 peaks of accelerators (datasheets, TFLOP/s), matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a named accelerator, or None when it is not in the table."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None

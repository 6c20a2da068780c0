"""The DINO teacher under DeepSpeed: an fp32 EMA of the student that never gets gradients.

Two layouts behind one interface (`forward`, `update`, `state_dict`, `load_state_dict`):

- `ReplicatedTeacher` (ZeRO 0-2): a full fp32 copy on every rank. The EMA reads the student's
  fp32 weights: the module's own parameters under fp32, DeepSpeed's fp32 master copy otherwise
  (`safe_get_full_fp32_param`, which communicates under ZeRO-1/2: prefer ZeRO-3 for bf16 DINO).
- `PartitionedTeacher` (ZeRO-3): the teacher is a second, optimizer-less ZeRO-3 engine, so each
  rank holds only its slice of every teacher tensor, gathered layer by layer for the forward like
  the student. Its fp32 EMA runs on the local slices against the student engine's local fp32
  master slices: no communication, and element by element the same arithmetic as an EMA of full
  tensors. Every parameter is gathered afresh for each forward (persistence threshold 0), so the
  slices written by the EMA are what the forward sees.

`state_dict` is shard-agnostic in both layouts: full fp32 tensors under the module's names (the
partitioned teacher gathers them once per save), so a checkpoint resumes at any world size and any
ZeRO stage, and `tools/export.py` reads it directly.

Not here: the DINO maths (`pipeline.methods.dino`), and when to save (`pipeline.train.engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.methods.dino import ema_parameters, ema_update_


class ReplicatedTeacher:
    """A full fp32 teacher on every rank (ZeRO 0-2)."""

    def __init__(self, teacher: nn.Module, engine: Any, device: torch.device) -> None:
        self.module = teacher.to(device=device, dtype=torch.float32)
        params, student = ema_parameters(self.module, engine.module)
        # Frozen student tensors (e.g. a fixed weight norm) never change and have no fp32 master.
        pairs = [(t, s) for t, s in zip(params, student, strict=True) if s.requires_grad]
        self.params = [t for t, _ in pairs]
        self.student_params = [s for _, s in pairs]
        # Under fp32 the module's parameters are the master weights; otherwise read DeepSpeed's.
        self.student_is_fp32 = all(p.dtype == torch.float32 for p in self.student_params)

    def forward(
        self, global_views: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None
    ) -> Any:
        """Teacher head outputs for the global views (fp32, no autograd); with iBOT `masks`,
        `(outputs, masked-patch outputs)` as `DINOTeacher.forward`."""
        with torch.no_grad():
            views = [v.float() for v in global_views]
            return self.module(views) if masks is None else self.module(views, masks)

    def _student_fp32(self) -> list[torch.Tensor]:
        if self.student_is_fp32:
            return self.student_params
        from deepspeed.utils import safe_get_full_fp32_param

        # ZeRO-0 under bf16/fp16 keeps no fp32 master: then the module weights are all there is.
        full = [safe_get_full_fp32_param(p) for p in self.student_params]
        return [p if f is None else f for f, p in zip(full, self.student_params, strict=True)]

    def update(self, momentum: float) -> None:
        """`teacher = m * teacher + (1 - m) * student`, on fp32 weights."""
        ema_update_(self.params, self._student_fp32(), momentum)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 tensors by name."""
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full tensors (from any layout's `state_dict`)."""
        self.module.load_state_dict(state)


class PartitionedTeacher:
    """The teacher as an optimizer-less ZeRO-3 engine whose EMA runs on local slices."""

    def __init__(self, teacher: nn.Module, engine: Any, ds_config: dict[str, Any]) -> None:
        import deepspeed

        cfg = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        cfg["zero_optimization"] = {
            **cfg.get("zero_optimization", {}),
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
        }
        self.engine, *_ = deepspeed.initialize(model=teacher, config=cfg)
        self.module = self.engine.module
        self.names = [n for n, _ in self.module.named_parameters()]
        self.params, self.student_params = ema_parameters(self.module, engine.module)
        # Our fp32 copy of each local slice: the slice itself when the compute dtype is fp32.
        self.master = [
            p.ds_tensor if p.ds_tensor.dtype == torch.float32 else p.ds_tensor.float()
            for p in self.params
        ]
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def forward(
        self, global_views: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None
    ) -> Any:
        """Teacher head outputs for the global views, gathered layer by layer (no autograd);
        with iBOT `masks`, `(outputs, masked-patch outputs)` as `DINOTeacher.forward`."""
        dtype = self.params[0].ds_tensor.dtype
        with torch.no_grad():
            views = [v.to(dtype) for v in global_views]
            return self.engine(views) if masks is None else self.engine(views, masks)

    def update(self, momentum: float) -> None:
        """EMA of the local fp32 slices against the student's local fp32 master slices."""
        from deepspeed.utils import safe_get_local_fp32_param

        # Frozen student tensors (e.g. a fixed weight norm) never change: nothing to average.
        pairs = [(m, s) for m, s in zip(self.master, self.student_params, strict=True)
                 if s.requires_grad]  # fmt: skip
        student = [safe_get_local_fp32_param(s) for _, s in pairs]
        ema_update_([m for m, _ in pairs], student, momentum)
        self._write_back()

    def _write_back(self) -> None:
        for p, m in zip(self.params, self.master, strict=True):
            if m is not p.ds_tensor:
                p.ds_tensor.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 tensors by name, gathered from every rank's slices (a collective)."""
        state: dict[str, torch.Tensor] = {}
        for name, p, m in zip(self.names, self.params, self.master, strict=True):
            parts = [torch.empty_like(m) for _ in range(self.world_size)]
            dist.all_gather(parts, m.contiguous())
            state[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        for name, buf in self.module.named_buffers():
            state[name] = buf.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's slice of each full tensor (saved at any world size or ZeRO stage)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"teacher state lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for name, p, m in zip(self.names, self.params, self.master, strict=True):
            full = state[name]
            if tuple(full.shape) != tuple(p.ds_shape):
                shape = tuple(p.ds_shape)
                raise ValueError(f"teacher {name}: saved {tuple(full.shape)}, expected {shape}")
            n = m.numel()
            flat = torch.zeros(n * self.world_size, dtype=torch.float32)
            flat[: full.numel()] = full.flatten().float()
            m.copy_(flat[self.rank * n : (self.rank + 1) * n].to(m.device))
        for name, buf in self.module.named_buffers():
            if name in state:
                buf.copy_(state[name])
        self._write_back()


Teacher = ReplicatedTeacher | PartitionedTeacher


def build_teacher(
    teacher: nn.Module, engine: Any, ds_config: dict[str, Any], device: torch.device
) -> Teacher:
    """The layout that matches the student's ZeRO stage."""
    if ds_config["zero_optimization"]["stage"] == 3:
        return PartitionedTeacher(teacher, engine, ds_config)
    return ReplicatedTeacher(teacher, engine, device)

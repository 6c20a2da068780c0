"""Per-step schedules as pure functions of the optimizer step.

Learning rate (warm-up from 0, then cosine to `min_lr`, or with `optim.schedule: wsd` warm-up,
constant, cosine cool-down; scaled by global batch / 256), weight decay (cosine from start to end),
DINO teacher momentum (cosine to 1) and teacher temperature (linear warm-up, then constant). Being
functions of the step alone (a run keeps its global batch across world sizes), they need no state
in a checkpoint: a resumed run recomputes them from the step it resumes at.

Each method's schedules are the ones its official code computes:

- DINO (`utils.cosine_scheduler`): the warm-up is `numpy.linspace(0, peak, warmup)`, whose last
  step already reaches the peak; the cosine runs over `numpy.arange(n) / n`; the teacher
  temperature is `numpy.linspace(warmup_temp, temp, warmup_epochs)` indexed by the epoch, so it is
  constant within an epoch (`method.dino.teacher_temp_per_step` moves it every step instead).
- MAE (`util/lr_sched.adjust_learning_rate`, per iteration at a fractional epoch): the warm-up is
  `peak x step / warmup`, one step short of the peak at its last step; the cosine is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.config import DinoConfig, OptimConfig

Warmup = Literal["linspace", "linear"]


def cosine(progress: float, start: float, end: float) -> float:
    """Half-cosine from `start` (progress 0) to `end` (progress 1); clamped outside [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linspace_at(i: int, n: int, start: float, end: float) -> float:
    """`numpy.linspace(start, end, n)[i]`, computed as numpy does (both ends included; a
    one-point linspace is `[start]`)."""
    if n <= 1:
        return start
    if i >= n - 1:
        return end  # numpy sets the last point to `end` exactly
    return i * ((end - start) / (n - 1)) + start


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of MAE/DINO: lr = base_lr x global batch / 256."""
    return base_lr * global_batch / 256


def warmup_value(step: int, warmup: int, peak: float, style: Warmup) -> float:
    """Value at `step` < `warmup` of a warm-up from 0: DINO's linspace (peak at step warmup - 1)
    or MAE's linear ramp (peak x step / warmup)."""
    return linspace_at(step, warmup, 0.0, peak) if style == "linspace" else peak * step / warmup


def learning_rate(
    step: int, *, peak: float, min_lr: float, warmup: int, total: int, style: Warmup = "linear"
) -> float:
    """Warm-up from 0 to `peak` over `warmup` steps, then cosine to `min_lr` at `total`."""
    if step < warmup:
        return warmup_value(step, warmup, peak, style)
    return cosine((step - warmup) / max(total - warmup, 1), peak, min_lr)


def wsd_learning_rate(
    step: int, *, peak: float, min_lr: float, warmup: int, decay: int, total: int,
    style: Warmup = "linear",
) -> float:  # fmt: skip
    """Warm-up, then constant at `peak`, then cosine to `min_lr` over the last `decay` steps
    (nothing before the cool-down depends on `total`: a run can be extended, then annealed)."""
    if step < warmup:
        return warmup_value(step, warmup, peak, style)
    return cooldown(step, peak, min_lr, decay=decay, total=total)


def cooldown(step: int, start: float, end: float, *, decay: int, total: int) -> float:
    """`start` until the last `decay` steps of `total`, then cosine to `end` over them."""
    begin = total - decay
    if step <= begin or decay <= 0:
        return start  # held exactly (the cosine's rounding would differ at the last bit)
    return cosine((step - begin) / decay, start, end)


def rewarm_factor(step: int, start: int, length: int) -> float:
    """Multiplier of the learning rate after a resume whose AdamW moments restarted from zero at
    `start`: linear from 1/length to 1 over `length` steps (fresh moments at full lr would make
    the first updates as large as at the start of training, a loss-spike risk)."""
    return min(1.0, (step - start + 1) / max(length, 1))


def teacher_temperature(
    epoch: float, *, warmup_temp: float, temp: float, warmup_epochs: int, per_step: bool = False
) -> float:
    """DINO's teacher temperature at (fractional) `epoch`: `linspace(warmup_temp, temp,
    warmup_epochs)` at the whole epoch, then `temp`; `per_step` ramps linearly in the fractional
    epoch instead, reaching `temp` at `warmup_epochs`."""
    if epoch >= warmup_epochs:
        return temp
    if per_step:
        return warmup_temp + (temp - warmup_temp) * epoch / warmup_epochs
    return linspace_at(math.floor(epoch), warmup_epochs, warmup_temp, temp)


@dataclass(frozen=True)
class Schedules:
    """Everything that varies with the step, resolved from the recipe and the run's shape."""

    optim: OptimConfig
    dino: DinoConfig | None
    steps_per_epoch: int
    total_steps: int
    global_batch: int

    @property
    def peak_lr(self) -> float:
        return scaled_lr(self.optim.lr, self.global_batch)

    @property
    def warmup_steps(self) -> int:
        return round(self.optim.warmup_epochs * self.steps_per_epoch)

    @property
    def warmup_style(self) -> Warmup:
        """The official warm-up of the run's method: DINO's linspace, MAE's linear ramp."""
        return "linspace" if self.dino is not None else "linear"

    @property
    def decay_steps(self) -> int:
        """`wsd`: length of the cool-down, `optim.decay_fraction` of the run, never reaching into
        the warm-up (a `train.steps` run's epochs are only known here)."""
        decay = round(self.optim.decay_fraction * self.total_steps)
        return min(decay, max(self.total_steps - self.warmup_steps, 0))

    @property
    def rewarm_steps(self) -> int:
        """Length of the learning-rate re-warm-up after a resume with fresh AdamW moments: the
        recipe's warm-up, or 1% of the run where it has none."""
        return max(self.warmup_steps, math.ceil(0.01 * self.total_steps), 1)

    def epoch(self, step: int) -> float:
        """Fractional epoch at `step`."""
        return step / self.steps_per_epoch

    def _decay(self, step: int, start: float, end: float) -> float:
        """A value with no warm-up: cosine over the run, or (wsd) held, then the cool-down."""
        if self.optim.schedule == "wsd":
            return cooldown(step, start, end, decay=self.decay_steps, total=self.total_steps)
        return cosine(step / max(self.total_steps, 1), start, end)

    def lr(self, step: int) -> float:
        """The learning rate at `step` (before any re-warm-up after a resume)."""
        o = self.optim
        if o.schedule == "wsd":
            return wsd_learning_rate(step, peak=self.peak_lr, min_lr=o.min_lr,
                                     warmup=self.warmup_steps, decay=self.decay_steps,
                                     total=self.total_steps, style=self.warmup_style)  # fmt: skip
        return learning_rate(step, peak=self.peak_lr, min_lr=o.min_lr, warmup=self.warmup_steps,
                             total=self.total_steps, style=self.warmup_style)  # fmt: skip

    def at(self, step: int) -> dict[str, float]:
        """lr, weight decay and (for DINO) teacher momentum and temperature at `step`."""
        wd, wd_end = self.optim.weight_decay, self.optim.weight_decay_end
        values = {
            "lr": self.lr(step),
            "wd": wd if wd_end is None else self._decay(step, wd, wd_end),
        }
        if self.dino is not None:
            values["momentum"] = self._decay(step, self.dino.momentum_teacher, 1.0)
            per_step = self.dino.teacher_temp_per_step
            values["teacher_temp"] = teacher_temperature(
                self.epoch(step) if per_step else step // self.steps_per_epoch,
                warmup_temp=self.dino.warmup_teacher_temp,
                temp=self.dino.teacher_temp,
                warmup_epochs=self.dino.warmup_teacher_temp_epochs,
                per_step=per_step,
            )
        return values

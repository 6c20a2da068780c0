"""Per-step schedules as pure functions of the optimizer step.

Learning rate (linear warm-up, then cosine to `min_lr`, scaled by global batch / 256), weight decay
(cosine from start to end), DINO teacher momentum (cosine to 1) and teacher temperature (linear
warm-up, then constant). Being functions of the step alone, they need no state in a checkpoint: a
resumed run recomputes them from the step it resumes at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import DinoConfig, OptimConfig


def cosine(progress: float, start: float, end: float) -> float:
    """Half-cosine from `start` (progress 0) to `end` (progress 1); clamped outside [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of MAE/DINO: lr = base_lr x global batch / 256."""
    return base_lr * global_batch / 256


def learning_rate(step: int, *, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine to `min_lr` at `total`."""
    if step < warmup:
        return peak * step / warmup
    return cosine((step - warmup) / max(total - warmup, 1), peak, min_lr)


def rewarm_factor(step: int, start: int, length: int) -> float:
    """Multiplier of the learning rate after a resume whose AdamW moments restarted from zero at
    `start`: linear from 1/length to 1 over `length` steps (fresh moments at full lr would make
    the first updates as large as at the start of training, a loss-spike risk)."""
    return min(1.0, (step - start + 1) / max(length, 1))


def teacher_temperature(
    epoch: float, *, warmup_temp: float, temp: float, warmup_epochs: float
) -> float:
    """Linear from `warmup_temp` to `temp` over `warmup_epochs`, then constant (DINO)."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / warmup_epochs


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
    def rewarm_steps(self) -> int:
        """Length of the learning-rate re-warm-up after a resume with fresh AdamW moments: the
        recipe's warm-up, or 1% of the run where it has none."""
        return max(self.warmup_steps, math.ceil(0.01 * self.total_steps), 1)

    def epoch(self, step: int) -> float:
        """Fractional epoch at `step`."""
        return step / self.steps_per_epoch

    def at(self, step: int) -> dict[str, float]:
        """lr, weight decay and (for DINO) teacher momentum and temperature at `step`."""
        progress = step / max(self.total_steps, 1)
        wd_end = self.optim.weight_decay_end
        values = {
            "lr": learning_rate(
                step,
                peak=self.peak_lr,
                min_lr=self.optim.min_lr,
                warmup=self.warmup_steps,
                total=self.total_steps,
            ),
            "wd": self.optim.weight_decay
            if wd_end is None
            else cosine(progress, self.optim.weight_decay, wd_end),
        }
        if self.dino is not None:
            values["momentum"] = cosine(progress, self.dino.momentum_teacher, 1.0)
            values["teacher_temp"] = teacher_temperature(
                self.epoch(step),
                warmup_temp=self.dino.warmup_teacher_temp,
                temp=self.dino.teacher_temp,
                warmup_epochs=self.dino.warmup_teacher_temp_epochs,
            )
        return values

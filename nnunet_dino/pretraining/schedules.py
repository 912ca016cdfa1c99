"""Per-step schedules of a stage: learning rate (linear warm-up, cosine decay), teacher EMA momentum (cosine to its
final value, as DINO) and teacher temperature (linear warm-up)."""
from __future__ import annotations

import math

from .config import StageSettings


def cosine(start: float, end: float, t: int, steps: int) -> float:
    if steps <= 1:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(t, steps - 1) / (steps - 1)))


def learning_rate(stage: StageSettings, t: int) -> float:
    if t < stage.warmup_steps:
        return stage.lr * (t + 1) / stage.warmup_steps
    return cosine(stage.lr, stage.min_lr, t - stage.warmup_steps, stage.steps - stage.warmup_steps)


def teacher_momentum(stage: StageSettings, t: int) -> float:
    return cosine(stage.teacher_momentum[0], stage.teacher_momentum[1], t, stage.steps)


def teacher_temperature(stage: StageSettings, t: int) -> float:
    warm = max(1, min(stage.steps, 3 * stage.warmup_steps))  # DINO warms the temperature up over ~3x the lr warm-up
    lo, hi = stage.teacher_temp
    return hi if t >= warm else lo + (hi - lo) * t / warm

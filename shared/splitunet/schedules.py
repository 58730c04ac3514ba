"""Learning-rate schedules as a closed-form function of the step, applied by every party before its update.

A schedule is a pure function ``factor(step)`` (no scheduler state): the sites and the aggregator set
``lr = base_lr * factor(step)`` on their optimizers before stepping, so they agree without exchanging anything,
and a run restored from a checkpoint at step ``s`` continues with the right rate.

- ``constant``: 1.
- ``cosine``: linear warm-up over ``warmup_steps`` then cosine decay from 1 to ``min_factor`` at ``total_steps``.
- ``poly``: warm-up then ``(1 - t) ** 0.9`` (nnU-Net's schedule), floored at ``min_factor``.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch


class LrSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"
    POLY = "poly"


def lr_factor(
    schedule: LrSchedule | str, step: int, total_steps: int, *, warmup_steps: int = 0, min_factor: float = 0.0
) -> float:
    """The multiplier of the base learning rate at ``step`` (1-based) of ``total_steps``."""
    kind = LrSchedule(schedule)
    if total_steps < 1 or warmup_steps < 0 or not 0.0 <= min_factor <= 1.0:
        raise ValueError(
            f"need total_steps >= 1, warmup_steps >= 0 and min_factor in [0, 1]; got {total_steps}, "
            f"{warmup_steps}, {min_factor}"
        )
    if kind is LrSchedule.CONSTANT:
        return 1.0
    if warmup_steps and step <= warmup_steps:
        return max(step, 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    if kind is LrSchedule.COSINE:
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return max(min_factor, (1.0 - t) ** 0.9)


def set_lr(optimizer: torch.optim.Optimizer | None, lr: float) -> None:
    """Set every parameter group of ``optimizer`` to the learning rate ``lr``."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["lr"] = float(lr)

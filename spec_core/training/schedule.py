"""Learning-rate schedules: linear warmup, then cosine / linear / constant / WSD decay.

One pure function of the optimizer step, so resuming needs only the step count and the schedule
is identical however a run was interrupted. Warmup starts at lr/warmup (not 0) so the first step
is never wasted. Skipped (non-finite) steps still advance the schedule: the LR stays a function of
how much data has been consumed.
"""

from __future__ import annotations

import math

import torch

from spec_core.config import TrainingConfig


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_ratio: float = 0.0,
    wsd_decay_ratio: float = 0.2,
) -> float:
    """Multiplier of the peak LR for 0-based optimizer ``step``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(wsd_decay_ratio * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def warmup_steps(tcfg: TrainingConfig, total_steps: int) -> int:
    return math.ceil(tcfg.warmup_ratio * total_steps) if tcfg.warmup_ratio > 0 else 0


def build_scheduler(
    optimizer: torch.optim.Optimizer, tcfg: TrainingConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(tcfg, total_steps)
    min_ratio = tcfg.min_lr / tcfg.learning_rate if tcfg.learning_rate > 0 else 0.0

    def factor(step: int) -> float:
        return lr_factor(
            step, total_steps, warmup, tcfg.lr_schedule, min_ratio, tcfg.wsd_decay_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

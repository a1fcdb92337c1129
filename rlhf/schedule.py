"""Learning-rate schedules: linear warm-up, then cosine / linear decay to zero, or constant.

Same shapes as transformers' `get_scheduler` (which DeepSpeed-Chat uses), written as a LambdaLR so
the schedule needs nothing beyond torch and is easy to test on its own.
"""
from __future__ import annotations

import math

import torch

SCHEDULER_TYPES = ("cosine", "linear", "constant")


def lr_multiplier(step: int, *, kind: str, num_warmup_steps: int, num_training_steps: int) -> float:
    """Factor applied to the base learning rate at optimizer step `step` (0-based)."""
    if kind not in SCHEDULER_TYPES:
        raise ValueError(f"lr_scheduler_type must be one of {SCHEDULER_TYPES}, got {kind!r}")
    if num_warmup_steps > 0 and step < num_warmup_steps:
        return float(step + 1) / float(num_warmup_steps + 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(1, num_training_steps - num_warmup_steps)
    progress = min(1.0, float(step - num_warmup_steps) / decay_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, num_warmup_steps: int, num_training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + `kind` decay over `num_training_steps` optimizer steps."""
    if kind not in SCHEDULER_TYPES:
        raise ValueError(f"lr_scheduler_type must be one of {SCHEDULER_TYPES}, got {kind!r}")

    def fn(step: int) -> float:
        return lr_multiplier(
            step, kind=kind, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

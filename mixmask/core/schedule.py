"""The learning-rate schedule of training and of the evaluation protocols: a pure function of the step."""

from __future__ import annotations

import math
from collections.abc import Sequence


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, schedule: str = "cosine",
          milestones: Sequence[float] = (0.6, 0.8)) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up to `peak_lr`, then the named decay.

    cosine: peak·½(1 + cos(π·t)) with t the post-warm-up progress (SGDR, as in MoCo v2 / SimSiam);
    step: ×0.1 at each milestone (fractions of training); constant: peak.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        frac = step / max(1, total_steps)
        return peak_lr * 0.1 ** sum(frac >= m for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}; valid: cosine, step, constant")

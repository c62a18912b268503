"""Learning rate as a pure function of consumed samples: warmup, then decay (DESIGN.md)."""

from __future__ import annotations

import bisect
import math

from launcher.types.plan import BatchPlan


def lr_at(plan: BatchPlan, samples: int) -> float:
    """LR for the optimizer step that starts after `samples` samples have been consumed; in an
    early stop's cooldown (plan.cooldown) the schedule's LR x the linear fall to 0."""
    lr = _scheduled(plan, samples)
    if plan.cooldown and samples >= plan.cooldown[0]:
        start, end = plan.cooldown
        lr *= max(end - samples, 0) / (end - start)
    return lr


def _scheduled(plan: BatchPlan, samples: int) -> float:
    if samples < plan.warmup_samples:
        frac = samples / plan.warmup_samples
        return plan.warmup_start_lr + (plan.lr - plan.warmup_start_lr) * frac
    if plan.decay == "constant":
        return plan.lr
    if plan.decay == "step":
        return plan.lr * plan.gamma ** bisect.bisect_right(plan.milestone_samples, samples)
    span = plan.total_samples - plan.warmup_samples
    t = min(max((samples - plan.warmup_samples) / span, 0.0), 1.0) if span > 0 else 1.0
    if plan.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    elif plan.decay == "poly":
        shape = (1.0 - t) ** plan.decay_power
    else:
        raise ValueError(f"unknown decay {plan.decay!r}")
    return plan.end_lr + (plan.lr - plan.end_lr) * shape

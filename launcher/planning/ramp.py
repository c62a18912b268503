"""Batch ramp-up: the stages of a fixed ramp (the batch doubles in equal shares of samples up
to global_batch), each a plan with the LR the scaling rule gives its batch. PURE."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

from launcher.config.optimization import RampConfig
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError
from launcher.planning.rules import fmt, scale_lr
from launcher.planning.split import split_for
from launcher.types.plan import BatchPlan


def starts(start: int, gb: int) -> bool:
    """Whether a ramp-up from `start` reaches global batch `gb` by doublings."""
    ratio = gb // start if 0 < start < gb else 0
    return bool(ratio) and gb % start == 0 and not ratio & (ratio - 1)


def ramp_batches(ramp: RampConfig, gb: int) -> list[int]:
    """The ramp-up's global batches before global_batch: start, 2 start, 4 start, ..."""
    start = ramp.start_batch
    if start is None:  # no ramp-up
        return []
    ratio = gb // start
    if not starts(start, gb):
        fits = [gb >> k for k in range(1, gb.bit_length()) if gb % (1 << k) == 0]
        near = sorted(fits, key=lambda b: abs(b - start))[:2]
        raise ConfigError(
            f"ramp.start_batch={start}: global_batch {gb} must be start_batch x a power of two "
            f"(the ramp-up doubles the batch each stage); nearest valid: "
            f"{' or '.join(map(str, sorted(near))) or 'none (global_batch is odd)'}"
        )
    return [start << k for k in range(ratio.bit_length() - 1)]


def ramp_stages(
    cfg: RunConfig, steady: BatchPlan, batches: list[int], memory: dict[str, Any] | None
) -> tuple[BatchPlan, ...]:
    """One plan per ramp-up stage: its batch split for the same world size and caps, its steps
    and samples (origin_step/origin_samples to steps), and the steady plan's LR curve scaled by
    the scaling rule's lr(stage batch) / lr(global_batch): same optimizer, warmup and decay."""
    share = Fraction(cfg.ramp.samples, len(batches))
    stages, step, samples = [], 0, 0
    for k, b in enumerate(batches):
        n = max(math.ceil((share * (k + 1) - samples) / b), 0)
        if n == 0:
            continue
        stages.append(scaled_stage(cfg, steady, b, memory, (step, samples), step + n))
        step, samples = step + n, samples + n * b
    return tuple(stages)


def scaled_stage(
    cfg: RunConfig,
    steady: BatchPlan,
    batch: int,
    memory: dict[str, Any] | None,
    origin: tuple[int, int],
    steps: int,
) -> BatchPlan:
    """A ramp's stage at `batch` from `origin` (step, samples) to `steps`: its batch split for
    the steady plan's world size and caps, the steady plan's optimizer and schedule, its LR curve
    x the scaling rule's lr(batch) / lr(global_batch)."""
    world = steady.world_size
    try:
        micro, accum, noise, why = split_for(cfg, batch, world, memory, steady.oom_recovery)
    except ConfigError as exc:
        said = f"ramp.start_batch={cfg.ramp.start_batch}"
        if cfg.ramp.start_batch_tokens is not None:  # what the user wrote (planning/tokens.py)
            said = f"ramp.start_batch_tokens={cfg.ramp.start_batch_tokens}"
        raise ConfigError(f"{said}: the stage at global batch {batch}: {exc}") from None
    lr = scale_lr(cfg.optim, batch, steady.optimizer)[0]
    r = lr / steady.lr
    why["lr"] = f"{fmt(lr)} = {fmt(steady.lr)} x {fmt(r)} (scaling rule at batch {batch})"
    return dataclasses.replace(
        steady,
        global_batch=batch,
        per_device_batch=batch // world,
        micro_batch=micro,
        accumulation=accum,
        noise=noise,
        lr=lr,
        warmup_start_lr=steady.warmup_start_lr * r,
        end_lr=steady.end_lr * r,
        origin_step=origin[0],
        origin_samples=origin[1],
        steps=steps,
        reasons=steady.reasons | why,
    )

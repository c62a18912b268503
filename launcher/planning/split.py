"""The batch split: micro-batch x accumulation x world size = global batch, exactly; the
re-split after an out-of-memory error; which batch sizes the noise-scale estimate compares. PURE."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from launcher.config.capabilities import capabilities
from launcher.config.execution import BackendConfig, TrainerConfig
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError, LauncherError
from launcher.types.plan import BatchPlan


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _nearest_multiples(value: int, unit: int) -> str:
    low = (value // unit) * unit
    options = [m for m in (low, low + unit) if m > 0 and m != value]
    return " or ".join(str(m) for m in options)


def batch_step(world_size: int, micro_batch: int | str) -> tuple[int, str]:
    """(step, words): the global batches split_batch accepts are the positive multiples of `step`
    (a micro-batch above the caps aside): the world size, x an explicit micro-batch."""
    if micro_batch == "auto":
        return world_size, f"a multiple of the world size {world_size}"
    step = world_size * int(micro_batch)
    return step, f"a multiple of {step} (micro_batch {micro_batch} x world size {world_size})"


def split_batch(
    global_batch: int,
    world_size: int,
    micro_batch: int | str,
    max_micro_batch: int,
    memory_cap: int | None = None,
) -> tuple[int, int, dict[str, str]]:
    """(micro_batch, accumulation, reasons) with micro x accumulation x world == global, exactly.

    `memory_cap` is the largest micro-batch the measured device memory allows (None: not measured).
    """
    if world_size > global_batch:
        raise ConfigError(
            f"global_batch={global_batch}: smaller than the world size {world_size}; every device "
            f"needs at least one sample per step, so use global_batch >= {world_size}"
        )
    if global_batch % world_size:
        raise ConfigError(
            f"global_batch={global_batch}: not divisible by the world size {world_size} "
            f"(remainder {global_batch % world_size}); nearest valid: "
            f"{_nearest_multiples(global_batch, world_size)}"
        )
    per_device = global_batch // world_size
    caps = {"max_micro_batch": max_micro_batch}
    if memory_cap is not None:
        caps["memory"] = memory_cap
    cap_source, cap = min(caps.items(), key=lambda kv: kv[1])
    reasons = {"per_device_batch": f"{per_device} = global {global_batch} / world {world_size}"}

    if micro_batch != "auto":
        micro = int(micro_batch)
        if micro > cap:
            raise ConfigError(
                f"micro_batch={micro}: larger than the cap {cap} ({cap_source}); "
                f"use micro_batch <= {cap} or micro_batch=auto"
            )
        if per_device % micro:
            fitting = [d for d in _divisors(per_device) if d <= cap]
            raise ConfigError(
                f"micro_batch={micro}: does not divide the per-device batch {per_device} "
                f"(global {global_batch} / world {world_size}); valid micro-batches: "
                f"{', '.join(map(str, fitting))}; or keep it with global_batch "
                f"{_nearest_multiples(global_batch, micro * world_size)}"
            )
        reasons["micro_batch"] = f"{micro} (micro_batch={micro}, divides {per_device})"
    else:
        micro = max(d for d in _divisors(per_device) if d <= cap)
        why = f"largest divisor of {per_device} that is <= {cap} ({cap_source})"
        if micro < per_device and micro * 2 <= cap:
            better = world_size * cap * math.ceil(per_device / cap)
            why += (
                f"; {per_device} has no divisor in ({micro}, {cap}]: "
                f"global_batch {better} would allow micro {cap}"
            )
        reasons["micro_batch"] = f"{micro} = {why}"
    accumulation = per_device // micro
    reasons["accumulation"] = (
        f"{accumulation} = {global_batch} / ({micro} micro x {world_size} devices)"
    )
    return micro, accumulation, reasons


class OutOfMemoryAtOneSample(LauncherError):
    """Even a micro-batch of one sample ran out of memory (exit 1)."""


def shrink_micro_batch(plan: BatchPlan, step: int, ranks: list[int]) -> BatchPlan:
    """The plan after an out-of-memory error: the largest micro-batch <= half the old one that
    divides the per-device batch, with the accumulation that keeps the global batch exact."""
    if plan.micro_batch == 1:
        raise OutOfMemoryAtOneSample(
            f"out of memory on rank(s) {ranks} at step {step} with micro-batch 1: the model does "
            "not fit this device; use one with more memory, mixed precision, or a smaller model"
        )
    micro = max(d for d in _divisors(plan.per_device_batch) if d <= plan.micro_batch // 2)
    accumulation = plan.per_device_batch // micro
    why = (
        f"{micro} after out of memory on rank(s) {ranks} at step {step} with micro-batch "
        f"{plan.micro_batch} (was: {plan.reasons.get('micro_batch', '')})"
    )
    reasons = plan.reasons | {
        "micro_batch": why,
        "accumulation": f"{accumulation} = {plan.global_batch} / ({micro} micro x "
        f"{plan.world_size} devices)",
    }
    noise = plan.noise
    if noise != "off" and plan.data != "budget":  # accumulation is 2 or more now
        noise, reasons["noise_scale"] = noise_mode(
            micro, accumulation, plan.global_batch, plan.world_size, plan.oom_recovery, 1
        )
    return dataclasses.replace(
        plan, micro_batch=micro, accumulation=accumulation, noise=noise, reasons=reasons
    )


def noise_mode(
    micro: int,
    accumulation: int,
    global_batch: int,
    world_size: int,
    explicit_reduce: bool,
    split_every: int,
) -> tuple[str, str]:
    """(mode, reason): which two batch sizes the noise-scale estimate compares
    (launcher/batchsize/noise.py).

    micro: the first micro-batch's gradient on each rank (seen before accumulation goes on) vs
    the global one; rank: each rank's gradient before the all-reduce vs the global one (one
    micro-batch per step, reduced after the micro-steps); split: one micro-batch per step and
    nothing local to see (one rank, or DDP reducing inside backward), so every `split_every`-th
    step runs its micro-batch as two halves and compares the first half's gradient.
    """
    head = (
        "tr(Sigma) and |G|^2 (McCandlish et al. 2018), moving averages over trainer.noise_window "
        "of the run's samples, from "
    )
    if accumulation > 1:
        return "micro", (
            f"{head}|first micro-batch gradient|^2 ({micro} samples, mean over ranks) vs "
            f"|global gradient|^2 ({global_batch}), every step"
        )
    if world_size > 1 and explicit_reduce:
        return "rank", (
            f"{head}|gradient|^2 of each rank before the all-reduce ({micro} samples, mean over "
            f"ranks) vs after it ({global_batch}), every step"
        )
    why = "one micro-batch on one rank" if world_size == 1 else "DDP reduces inside backward"
    return "split", (
        f"{head}every {split_every}th step (trainer.noise_split_every) run as two half "
        f"micro-batches, |first half's gradient|^2 ({micro // 2} samples) vs |global "
        f"gradient|^2 ({global_batch}): {why}, nothing local to compare otherwise (a BatchNorm "
        "model normalises over each half on those steps)"
    )


def noise_measurement(
    trainer: TrainerConfig,
    backend: BackendConfig,
    global_batch: int,
    micro: int,
    accumulation: int,
    world_size: int,
    recover: bool,
) -> tuple[str, str]:
    """(mode, reason) for the run: off by config or where the loop cannot see the gradients."""
    if not trainer.noise_scale:
        return "off", "not measured (trainer.noise_scale=false)"
    unseen = capabilities(backend).gradients
    if unseen is not None:
        return "off", f"not measured under {unseen}"
    split_every = trainer.noise_split_every
    mode, why = noise_mode(micro, accumulation, global_batch, world_size, recover, split_every)
    if mode == "split" and micro < 4:  # halves of one sample cannot train BatchNorm
        return "off", (
            f"not measured: {micro} sample(s) per step on each rank, too few to split in halves "
            "of 2 or more"
        )
    return mode, why


def split_for(
    cfg: RunConfig, global_batch: int, world_size: int, memory: dict[str, Any] | None, recover: bool
) -> tuple[int, int, str, dict[str, str]]:
    """(micro, accumulation, noise mode, reasons) for `global_batch` (split_batch, then
    noise_measurement)."""
    micro, accum, reasons = split_batch(
        global_batch,
        world_size,
        cfg.micro_batch,
        cfg.max_micro_batch,
        memory["cap"] if memory else None,
    )
    noise, reasons["noise_scale"] = noise_measurement(
        cfg.trainer, cfg.backend, global_batch, micro, accum, world_size, recover
    )
    return micro, accum, noise, reasons

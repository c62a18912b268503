"""Token-budget micro-batches (data.micro_batch_tokens) in the plan.

With a budget the micro-batches of a step are cut by tokens (launcher/data/sampler.py
BudgetSampler), so the plan's micro_batch is a cap in samples, the per-device batch (an
out-of-memory re-split halves it), and its accumulation varies by step. The plan says what the
budget gives on this data: the micro-batches a step is expected to take and the padding expected,
beside the padding of fixed micro-batches (launcher/data/budget.py, from the data's lengths).
The noise meter compares each rank's whole gradient with the global one (rank mode): the first
micro-batch of a step, its longest samples, is no fair small batch; on one process it is off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from launcher.config.components import DataConfig
from launcher.config.schema import ConcreteConfig
from launcher.errors import ConfigError
from launcher.types.plan import BatchPlan

DRAWS = 64  # random steps the plan's padding estimate averages over


def budget_of(data: DataConfig) -> int:
    """data.micro_batch_tokens of your data's config; 0 for any other data."""
    return int(getattr(data, "micro_batch_tokens", 0) or 0)


def budget_config(cfg: ConcreteConfig, world_size: int) -> ConcreteConfig:
    """The config the plan is made from: micro_batch = the per-device batch (the budget cuts
    it); refused where a budget cannot apply."""
    from launcher.data import build_splits  # heavy: numpy
    from launcher.data.stream import is_stream  # heavy: torch

    budget = budget_of(cfg.data)
    key = f"data.micro_batch_tokens={budget}"
    splits = build_splits(cfg.data)
    packed = getattr(cfg.data, "pack_length", 0)
    if is_stream(splits.train) or packed or splits.collate is None:
        raise ConfigError(
            f"{key}: needs map-style data of variable-length samples and your collate_fn that "
            "pads them (a stream's lengths are not known before a step; packed sequences all "
            "have one length)"
        )
    ramped = cfg.ramp.start_batch is not None or cfg.ramp.start_batch_tokens is not None
    if ramped:
        raise ConfigError(
            f"{key}: a batch ramp-up (ramp.start_batch) with token budgets is not supported; "
            "drop one of them"
        )
    longest = splits.spec.longest
    if budget < longest:
        raise ConfigError(
            f"{key}: smaller than the longest sample ({longest:,} tokens, {splits.spec.worst}); "
            f"must be at least {longest:,}"
        )
    per_device = max(cfg.global_batch // world_size, 1)
    return ConcreteConfig(dataclasses.replace(cfg, micro_batch=per_device))


def budget_plan(data: DataConfig, plan: BatchPlan, lengths: Sequence[int]) -> BatchPlan:
    """The plan's micro_batch, accumulation and noise rows for a token budget."""
    import numpy as np

    from launcher.data.budget import (  # heavy: numpy
        expected_padding,
        fixed_padding,
        split_by_tokens,
    )

    budget, per_device = budget_of(data), plan.per_device_batch
    sample = np.asarray(lengths)
    rng = np.random.default_rng(0)
    draws = [rng.choice(sample, per_device) for _ in range(DRAWS)]
    mean = sum(len(split_by_tokens([int(n) for n in d], budget)) for d in draws) / DRAWS
    padding = expected_padding(list(lengths), per_device, budget, DRAWS, 0)
    fixed_micro = max(1, min(per_device, budget // int(sample.max())))
    while per_device % fixed_micro:
        fixed_micro -= 1
    fixed = fixed_padding(list(lengths), per_device, fixed_micro, DRAWS, 0)
    reasons = plan.reasons | {
        "memory": "not probed: micro-batches by tokens (data.micro_batch_tokens); a step that "
        "runs out of memory is re-split (at most half as many samples per micro-batch)",
        "micro_batch": f"up to {per_device} samples and {budget:,} padded tokens each "
        "(data.micro_batch_tokens): a step's samples grouped by length",
        "accumulation": f"varies by step: ~{mean:.1f} micro-batches expected, as many on every "
        f"rank; padding ~{padding:.0%} of the token slots, vs ~{fixed:.0%} in fixed "
        f"micro-batches of {fixed_micro} (the same worst case; {DRAWS} random steps of "
        "the data's lengths)",
    }
    noise = plan.noise
    if noise != "off":
        noise = "rank" if plan.world_size > 1 else "off"
        reasons["noise_scale"] = (
            "rank: each rank's gradient before the all-reduce vs after it (a budget's first "
            "micro-batch holds a step's longest samples, no fair small batch)"
            if noise == "rank"
            else "off: token-budget micro-batches on one process give no fair small batch"
        )
    return dataclasses.replace(plan, reasons=reasons, noise=noise, data="budget")

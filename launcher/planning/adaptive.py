"""Start small and grow: the adaptive batch ramp (ramp.mode=adaptive).

The run starts at ramp.start_batch. At every log step (where the noise meter has just folded in
the gradient norms, on every rank alike), once ramp.min_steps steps have been trained at the
current batch, the batch grows to the largest start_batch x 2^j that is <= B_simple /
ramp.noise_factor, up to global_batch (the cap). B_simple is the meter's moving average
(trainer.noise_window of the run's samples). McCandlish et al. 2018: the steps and the samples
to a given loss are both within 2x of their minimum around B_simple, and B_simple grows as the
loss falls; Merrill et al. 2025 measured the critical batch starting near 0, rising fast, then
plateauing, and trained OLMo-1B with such a batch-size warmup to slightly better loss in 43%
fewer steps. The batch never shrinks. A noise_factor below 1 trades samples for fewer steps.

Every batch trains the optimizer and schedule (in samples) of global_batch, with the LR the
scaling rule gives its batch (as the fixed ramp's stages do); micro-batch and accumulation are
re-planned against the memory cap at each change. A plan records the earlier stages
(`BatchPlan.grown`), so sample counts before a change stay exact; a checkpoint holds the plan, so
a resumed run (also on another world size) continues at the batch and stage it was in, with the
decisions already made. Decisions are made from all-reduced values; rank 0's is used everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from launcher.config.capabilities import capabilities
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError
from launcher.planning.length import run_length, run_samples
from launcher.planning.ramp import ramp_batches, scaled_stage
from launcher.planning.rules import fmt
from launcher.types.plan import AdaptiveStage, BatchPlan


def decide(
    batch: int, cap: int, noise: float | None, steps: int, min_steps: int, factor: float
) -> int | None:
    """PURE. The batch to grow to, or None: the largest batch x 2^j <= noise / factor and <= cap,
    once `steps` (trained at `batch`) >= `min_steps`."""
    if noise is None or not math.isfinite(noise) or steps < min_steps:
        return None
    limit = min(noise / factor, cap)
    new = batch
    while new * 2 <= limit:
        new *= 2
    return new if new > batch else None


def stage_plan(
    cfg: RunConfig, steady: BatchPlan, stage: AdaptiveStage, memory: dict[str, Any] | None
) -> BatchPlan:
    """The plan from the stage's (origin_step, origin_samples) on at its batch: the steady plan's
    (global_batch) optimizer and schedule (total_samples included: the LR curve is one function
    of samples over every stage), its LR x the scaling rule's lr(batch) / lr(global_batch);
    `steps` ends the run at the first step boundary after its epochs at this batch."""
    batch, origin_step, origin_samples = stage.batch, stage.origin_step, stage.origin_samples
    grown = stage.grown
    ladder = [*ramp_batches(cfg.ramp, cfg.global_batch), cfg.global_batch]
    if batch not in ladder:
        raise ConfigError(
            f"ramp.mode=adaptive: batch {batch} (from the checkpoint) is not one of the ramp's "
            f"{ladder}; resume with the ramp.start_batch and global_batch it was trained with"
        )
    unseen = capabilities(cfg.backend).gradients
    if unseen is not None or not cfg.trainer.noise_scale:
        raise ConfigError(
            "ramp.mode=adaptive: decides by the measured noise scale, which needs "
            "trainer.noise_scale=true and a backend whose gradients the loop sees"
            + (f" ({unseen})" if unseen else "")
        )
    total_exact = run_samples(cfg.trainer, steady.epoch_samples)
    steps = origin_step + max(math.ceil((total_exact - origin_samples) / batch), 0)
    plan = scaled_stage(cfg, steady, batch, memory, (origin_step, origin_samples), steps)
    if plan.noise == "off":
        raise ConfigError(
            f"ramp.start_batch={cfg.ramp.start_batch}: the adaptive ramp needs the noise scale "
            f"measured at batch {batch}, and it is {plan.reasons['noise_scale']}; start from a "
            "larger batch"
        )
    history = "; ".join(f"{b} from step {s:,} (sample {n:,})" for s, n, b in grown)
    seq = steady.sample_tokens
    reasons = plan.reasons | {
        "global_batch": f"{batch}: the adaptive ramp's batch now (global_batch {cfg.global_batch} "
        "is its cap)",
        "lr": f"{plan.reasons['lr']}; at the cap {steady.reasons['lr']}",
        "steps": f"{steps:,} if the batch stays {batch}: {origin_step:,} steps ({origin_samples:,} "
        f"samples) before it + ceil(({run_length(cfg.trainer, steady.epoch_samples, seq)} - "
        f"{origin_samples:,}) / {batch}); fewer as it grows",
        "ramp": f"adaptive from {cfg.ramp.start_batch} up to {cfg.global_batch}: at a log step, "
        f"once {cfg.ramp.min_steps} steps (ramp.min_steps) ran at the current batch, it grows to "
        f"the largest doubling <= B_simple / {fmt(cfg.ramp.noise_factor)} (ramp.noise_factor), "
        "the measured noise scale (McCandlish et al. 2018; Merrill et al. 2025); "
        f"{steady.optimizer} and the schedule of global_batch, LR by the scaling rule per batch"
        + (f"; so far: {history}; {batch} from step {origin_step:,}" if grown else ""),
    }
    return dataclasses.replace(plan, grown=grown, adaptive_cap=cfg.global_batch, reasons=reasons)


def event(
    old: BatchPlan, new: BatchPlan, noise: float, factor: float
) -> tuple[dict[str, Any], str]:
    """The metrics record and the printed line of a decision."""
    record = {
        "event": "ramp",
        "step": new.origin_step,
        "samples": new.origin_samples,
        "global_batch": new.global_batch,
        "was": old.global_batch,
        "noise_scale": noise,
        "micro_batch": new.micro_batch,
        "accumulation": new.accumulation,
        "lr": new.lr,
    }
    line = (
        f"launcher: ramp: global batch {old.global_batch} -> {new.global_batch} at step "
        f"{new.origin_step:,} (sample {new.origin_samples:,}): measured noise scale "
        f"{noise:,.0f} / {factor:g} (ramp.noise_factor) >= {new.global_batch}; micro-batch "
        f"{new.micro_batch} x accumulation {new.accumulation}, peak lr {new.lr:.6g}"
    )
    return record, line

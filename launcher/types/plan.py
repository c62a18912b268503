"""BatchPlan: every number a run trains with, and the reason for each (launcher/planning/ builds
it, every later layer reads it); AdaptiveStage: where an adaptive ramp is (a checkpoint or the
loop's decision says it, the planner plans it). Pure: nothing of launcher, no config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AdaptiveStage:
    """Where an adaptive ramp (ramp.mode=adaptive) is: the global batch it trains now, from
    (origin_step, origin_samples) on, and its earlier stages as (step, samples, batch)."""

    batch: int
    origin_step: int = 0
    origin_samples: int = 0
    grown: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """The numbers a run trains with; `reasons` says why for each one."""

    global_batch: int
    world_size: int
    per_device_batch: int
    micro_batch: int
    accumulation: int
    optimizer: str
    lr_rule: str
    base_lr: float
    lr: float
    weight_decay: float
    warmup_samples: int
    warmup_start_lr: float
    decay: str
    decay_power: float
    milestone_samples: tuple[int, ...]
    gamma: float
    end_lr: float
    epoch_samples: int
    steps: int
    total_samples: int
    oom_recovery: bool = True
    checkpoints: bool = True
    noise: str = "off"
    sample_tokens: int = 0  # tokens per sample of a sequence data set (0: not one)
    in_tokens: tuple[str, ...] = ()  # the keys the run states in tokens (planning/tokens.py)
    origin_step: int = 0
    origin_samples: int = 0
    ramp: tuple[BatchPlan, ...] = ()
    grown: tuple[tuple[int, int, int], ...] = ()  # adaptive ramp: earlier (step, samples, batch)
    adaptive_cap: int = 0  # adaptive ramp: the largest batch it may grow to (0: not adaptive)
    clip_grad_norm: float = 0.0  # optim.clip_grad_norm (0: off)
    budget: str = "-"  # enough / SHORT / ? vs an earlier run (launcher/batchsize/prior.py), - none
    data: str = "-"  # your data streamed or collated (launcher/data `loading`), - neither
    stop_step: int | None = None  # trainer.stop_after_samples: the step the run ends early at
    # (from, to) samples: the LR falls linearly to 0 before a stop; () none
    cooldown: tuple[int, int] | tuple[()] = ()
    memory: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def at(self, step: int) -> BatchPlan:
        """The plan optimizer step `step` (0-based) trains with: a ramp-up stage, or this one."""
        for stage in self.ramp:
            if step < stage.steps:
                return stage
        return self

    def samples_at(self, step: int) -> int:
        """Samples consumed once `step` optimizer steps are done (steps before `origin_step` ran
        with other global batches: the ramp-up's, or the checkpoint's when it was changed on
        resume)."""
        if step < self.origin_step and self.ramp:
            return self.at(step).samples_at(step)
        if step < self.origin_step and self.grown:  # an adaptive ramp's earlier batches
            start, samples, batch = next(g for g in reversed(self.grown) if g[0] <= step)
            return samples + (step - start) * batch
        return self.origin_samples + (step - self.origin_step) * self.global_batch

    def step_reaching(self, samples: int) -> int:
        """The fewest steps whose consumed samples reach `samples` (at most `steps`)."""
        lo, hi = 0, self.steps
        while lo < hi:
            mid = (lo + hi) // 2
            if self.samples_at(mid) >= samples:
                hi = mid
            else:
                lo = mid + 1
        return lo

    @property
    def end_step(self) -> int:
        """The step training ends at: `steps`, or earlier with trainer.stop_after_samples."""
        return self.steps if self.stop_step is None else self.stop_step

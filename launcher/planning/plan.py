"""BatchPlan: every derived training number, with the reason it was chosen. Pure functions only.

global_batch = micro_batch x accumulation x world_size, exactly. LR, warmup and decay follow the
large-batch policy (DESIGN.md) and are defined in samples, so they do not move when world size,
micro-batch or accumulation do. Nothing is rounded silently: what does not divide raises with
both numbers and the nearest valid choices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, cast

from launcher.backends.capabilities import capabilities
from launcher.config.optimization import OptimConfig, ScheduleConfig
from launcher.config.optimizers import OPTIMIZER_FACTS, SGD_FAMILY
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError, LauncherError

# plan_batch's arguments before the origin: cfg, world size, epoch samples and where the two
# numbers come from, the memory report
_PlanArgs = tuple["RunConfig", int, int, str, str, "dict[str, Any] | None"]


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
    origin_step: int = 0
    origin_samples: int = 0
    ramp: tuple[BatchPlan, ...] = ()
    grown: tuple[tuple[int, int, int], ...] = ()  # adaptive ramp: earlier (step, samples, batch)
    adaptive_cap: int = 0  # adaptive ramp: the largest batch it may grow to (0: not adaptive)
    clip_grad_norm: float = 0.0  # optim.clip_grad_norm (0: off)
    budget: str = "-"  # enough / SHORT / ? vs an earlier run (launcher/planning/prior.py), - none
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


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _nearest_multiples(value: int, unit: int) -> str:
    low = (value // unit) * unit
    options = [m for m in (low, low + unit) if m > 0 and m != value]
    return " or ".join(str(m) for m in options)


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


def base_lr_for(optim: OptimConfig, optimizer: str) -> tuple[float, str]:
    """(LR at ref_batch, its config key) for `optimizer`, which may be a large-batch swap."""
    if optimizer != optim.name and optim.large_batch.base_lr != "same":
        return optim.large_batch.base_lr, "optim.large_batch.base_lr"
    return optim.base_lr, "optim.base_lr"


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
    if noise != "off":  # accumulation is 2 or more now
        noise, reasons["noise_scale"] = noise_mode(
            micro, accumulation, plan.global_batch, plan.world_size, plan.oom_recovery, 1
        )
    return dataclasses.replace(
        plan, micro_batch=micro, accumulation=accumulation, noise=noise, reasons=reasons
    )


def scale_lr(
    optim: OptimConfig, global_batch: int, optimizer: str | None = None
) -> tuple[float, str, str]:
    """(lr, rule, reason) for `optimizer` (default optim.name) at `global_batch`.

    The base LR is the recipe's at ref_batch, or optim.large_batch.base_lr for a swapped-in
    optimizer; auto scaling is linear for the SGD family and square-root for the Adam family.
    """
    optimizer = optimizer or optim.name
    base, base_key = base_lr_for(optim, optimizer)
    family = "sgd" if optimizer in SGD_FAMILY else "adam"
    rule = optim.scaling
    if rule == "auto":
        rule = "linear" if family == "sgd" else "sqrt"
    k = global_batch / optim.ref_batch
    ratio = f"{global_batch}/{optim.ref_batch}"
    if rule == "linear":
        lr, why = base * k, f"{_fmt(base)} x {ratio}, linear rule (Goyal et al. 2017)"
    elif rule == "sqrt":
        lr, why = base * math.sqrt(k), f"{_fmt(base)} x sqrt({ratio}), square-root rule"
    else:
        lr, why = base, f"{_fmt(base)}, not scaled (optim.scaling=none)"
    if optim.scaling == "auto":
        why += f"; auto picks {rule} for {optimizer}"
    if base_key != "optim.base_lr":
        why += f"; base from {base_key}"
    return lr, rule, f"{_fmt(lr)} = {why}"


def choose_optimizer(optim: OptimConfig, global_batch: int) -> tuple[str, bool, str]:
    """(optimizer, swapped, reason): SGD -> LARS and Adam -> LAMB above the threshold."""
    big = optim.large_batch
    swap = OPTIMIZER_FACTS[optim.name].swap
    if swap is None:
        return optim.name, False, f"{optim.name} (optim.name)"
    if not big.enabled:
        return optim.name, False, f"{optim.name} (optim.large_batch.enabled=false)"
    if global_batch <= big.threshold:
        return (
            optim.name,
            False,
            (f"{optim.name}: global batch {global_batch} <= large-batch threshold {big.threshold}"),
        )
    target = swap if big.optimizer == "auto" else big.optimizer
    paper = "You et al. 2017" if target == "lars" else "You et al. 2019"
    return (
        target,
        True,
        (
            f"{target} instead of {optim.name}: global batch {global_batch} > "
            f"optim.large_batch.threshold {big.threshold} ({paper})"
        ),
    )


def weight_decay(optim: OptimConfig, swapped: bool) -> tuple[float, str]:
    """(weight decay, reason); never applied to norm and bias parameters."""
    if swapped and optim.large_batch.weight_decay != "same":
        return optim.large_batch.weight_decay, "optim.large_batch.weight_decay"
    return optim.weight_decay, "optim.weight_decay"


CLIP_ADVISED_AT = 8  # batch / ref_batch from which an unclipped plan says what was measured


def clipping(clip: float, scale: float) -> str:
    """The reason of the clip_grad_norm row; off at a batch CLIP_ADVISED_AT x the reference or
    more, it says what unclipped training did at 16x on MNIST-1D."""
    if clip:
        return f"the global gradient norm is clipped to {_fmt(clip)} before each step"
    why = "off (optim.clip_grad_norm=0)"
    if scale >= CLIP_ADVISED_AT:
        why += (
            f"; the batch is {_fmt(scale)}x optim.ref_batch: on MNIST-1D at 16x with the linear "
            "rule 3 of 8 seeds failed unclipped, none with optim.clip_grad_norm=1.0 "
            "(bench/README.md); consider it"
        )
    return why


def oom_recovery(cfg: RunConfig) -> tuple[bool, str]:
    """(on, reason): whether an out-of-memory step can be dropped on every rank and rerun."""
    wanted = cfg.trainer.oom_recovery
    if wanted is False:
        return False, "trainer.oom_recovery=false: an out-of-memory error ends the run"
    b = cfg.backend
    why = capabilities(b).oom_recovery
    if why is not None:
        if wanted is True:
            raise ConfigError(
                "trainer.oom_recovery=true: not possible with backend.zero_stage="
                f"{getattr(b, 'zero_stage', None)}: "
                f"{why}; use zero_stage 0 or 1, or trainer.oom_recovery=auto|false"
            )
        return False, f"auto: {why}; an out-of-memory error ends the run"
    return True, (
        "an out-of-memory error on any rank drops the step everywhere, halves the micro-batch "
        "and doubles the accumulation (global batch, LR and schedule unchanged)"
    )


def checkpointing(cfg: RunConfig) -> tuple[bool, str]:
    """(on, reason): whether checkpoints are written (and can be resumed) with this backend."""
    c = cfg.checkpoint
    why = capabilities(cfg.backend).checkpoints
    if why is not None:
        return False, why
    when = [f"every {c.every_samples:,} samples"] if c.every_samples else []
    when += [f"every {c.every_minutes:g} min"] if c.every_minutes else []
    return True, (
        f"{' and '.join(when + ['at the end'])}, the newest {c.keep} kept in "
        "run_dir/checkpoints (atomic, digest-checked)"
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
    cfg: RunConfig, global_batch: int, micro: int, accumulation: int, world_size: int, recover: bool
) -> tuple[str, str]:
    """(mode, reason) for the run: off by config or where the loop cannot see the gradients."""
    if not cfg.trainer.noise_scale:
        return "off", "not measured (trainer.noise_scale=false)"
    unseen = capabilities(cfg.backend).gradients
    if unseen is not None:
        return "off", f"not measured under {unseen}"
    split_every = cfg.trainer.noise_split_every
    mode, why = noise_mode(micro, accumulation, global_batch, world_size, recover, split_every)
    if mode == "split" and micro < 4:  # halves of one sample cannot train BatchNorm
        return "off", (
            f"not measured: {micro} sample(s) per step on each rank, too few to split in halves "
            "of 2 or more"
        )
    return mode, why


def run_samples(cfg: RunConfig, epoch_samples: int) -> Fraction:
    """trainer.epochs x the epoch, exactly (1.1 x 50000 is 55000): what the steps must cover."""
    return Fraction(repr(cfg.trainer.epochs)) * epoch_samples


def noise_window_samples(cfg: RunConfig, epoch_samples: int) -> float:
    """The noise-scale averages' time constant in samples: trainer.noise_window x the run's
    samples (run_samples, not the plan's rounded total, which moves with the batch)."""
    return cfg.trainer.noise_window * float(run_samples(cfg, epoch_samples))


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
        cfg, global_batch, micro, accum, world_size, recover
    )
    return micro, accum, noise, reasons


def plan_batch(
    cfg: RunConfig,
    world_size: int,
    epoch_samples: int,
    epoch_source: str = "",
    world_source: str = " processes",
    memory: dict[str, Any] | None = None,
    origin: tuple[int, int] = (0, 0),
    stage: tuple[int, int, int, tuple[Any, ...]] | None = None,
) -> BatchPlan:
    """The whole plan for one run. Raises ConfigError on anything that does not fit exactly.

    `memory` is the profile report of launcher/memory/probe.py, whose `cap` is the largest
    micro-batch the device memory allows; None when memory was not probed. `origin` = (step,
    samples) already done with another global batch (a global batch changed on resume). With a
    ramp-up (ramp.start_batch) its stages come first (`ramp_stages`) and the plan's origin is where
    global_batch takes over. An adaptive ramp (ramp.mode=adaptive) plans the batch it trains now:
    `stage` = (batch, origin step, origin samples, earlier stages), by default its start.
    """
    _within_the_data(cfg, epoch_samples)
    args: _PlanArgs = (cfg, world_size, epoch_samples, epoch_source, world_source, memory)
    if cfg.ramp.mode == "adaptive":
        from launcher.planning.adaptive import stage_plan

        batch, step, samples, grown = stage or (cast(int, cfg.ramp.start_batch), 0, 0, ())
        steady = _plan(*args, (0, 0))
        return _stopping(cfg, stage_plan(cfg, steady, batch, step, samples, grown, memory))
    return _stopping(cfg, _ramped(args, origin))


def _within_the_data(cfg: RunConfig, epoch_samples: int) -> None:
    """Sizes the data allows: a step no larger than the whole run, an evaluation interval of at
    least one sample (a global batch of 10^12 would try to index 7 TiB; 0 would divide by 0)."""
    total = run_samples(cfg, epoch_samples)
    if epoch_samples < 1:  # said by _plan, which names the empty split
        return
    if cfg.global_batch > total:
        raise ConfigError(
            f"global_batch={cfg.global_batch}: larger than the whole run ({float(total):,.0f} "
            f"samples = trainer.epochs {cfg.trainer.epochs:g} x {epoch_samples:,} per epoch); "
            "one step would train on more than the run has: lower it, or train more epochs"
        )
    if round(cfg.trainer.eval_every_epochs * epoch_samples) < 1:
        raise ConfigError(
            f"trainer.eval_every_epochs={cfg.trainer.eval_every_epochs:g}: less than one sample "
            f"of the {epoch_samples:,} per epoch; must be >= {1 / epoch_samples:.3g}"
        )


def _stopping(cfg: RunConfig, plan: BatchPlan) -> BatchPlan:
    """The plan with trainer.stop_after_samples' early end, if set."""
    stop = cfg.trainer.stop_after_samples
    if not stop:
        return plan
    if stop >= plan.total_samples:
        raise ConfigError(
            f"trainer.stop_after_samples={stop}: not before the end of the run "
            f"({plan.total_samples:,} samples); use a smaller value, or 0 to train to the end"
        )
    step = plan.step_reaching(stop)
    end = plan.samples_at(step)
    why = (
        f"; stops early after step {step:,} ({end:,} samples, the first step reaching "
        f"trainer.stop_after_samples={stop:,}); the schedule is the whole run's"
    )
    cool = cfg.trainer.stop_cooldown_samples
    cooldown: tuple[int, int] | tuple[()] = ()
    if cool:
        if cool > end:
            raise ConfigError(
                f"trainer.stop_cooldown_samples={cool}: longer than the {end:,} samples before "
                "the stop; use a smaller value"
            )
        cooldown = (end - cool, end)
        why += f", with the LR falling linearly to 0 from sample {end - cool:,} (cooldown)"
    stages = tuple(dataclasses.replace(s, cooldown=cooldown) for s in plan.ramp)
    return dataclasses.replace(
        plan,
        stop_step=step,
        cooldown=cooldown,
        ramp=stages,
        reasons=plan.reasons | {"steps": plan.reasons["steps"] + why},
    )


def _ramped(args: _PlanArgs, origin: tuple[int, int]) -> BatchPlan:
    """plan_batch before the early stop (`args`: its first six): a fixed ramp-up's stages, then
    global_batch."""
    cfg, _, epoch_samples, _, _, memory = args
    if cfg.ramp.start_batch is None:
        return _plan(*args, origin)
    batches = ramp_batches(cfg)
    if origin != (0, 0):  # the global batch changed on resume, after the ramp-up (resume.check)
        plan = _plan(*args, origin)
        why = f"{batches[0]} -> {cfg.global_batch}: done before the checkpoint resumed from"
        return dataclasses.replace(plan, reasons=plan.reasons | {"ramp": why})
    steady = _plan(*args, origin)
    if cfg.ramp.samples >= steady.total_samples:
        raise ConfigError(
            f"ramp.samples={cfg.ramp.samples}: the ramp-up must end before the run does "
            f"({steady.total_samples:,} samples); shorten it or train longer"
        )
    stages = ramp_stages(cfg, steady, batches, memory)
    end = stages[-1].steps, stages[-1].samples_at(stages[-1].steps)
    plan = _plan(*args, end)
    gb, share = cfg.global_batch, cfg.ramp.samples / len(batches)
    reasons = plan.reasons | {
        "steps": f"{plan.steps:,} = {end[0]:,} ramp-up steps ({end[1]:,} samples) + "
        f"ceil(({_fmt(cfg.trainer.epochs)} epochs x {epoch_samples:,} - {end[1]:,}) / {gb})",
        "ramp": "; ".join(
            f"{p.global_batch} (micro {p.micro_batch} x {p.accumulation}, lr {_fmt(p.lr)}) for "
            f"steps {p.origin_step:,}-{p.steps - 1:,}"
            for p in stages
        )
        + f"; {gb} from step {end[0]:,} (sample {end[1]:,}): the batch doubles every "
        f"{share:,.6g} samples (ramp.samples={cfg.ramp.samples:,}), each stage from the first "
        "step boundary after its share; LR = the plan's schedule x the scaling rule's ratio",
    }
    return dataclasses.replace(plan, ramp=stages, reasons=reasons)


def ramp_batches(cfg: RunConfig) -> list[int]:
    """The ramp-up's global batches before global_batch: start, 2 start, 4 start, ..."""
    start, gb = cfg.ramp.start_batch, cfg.global_batch
    if start is None:  # no ramp-up
        return []
    ratio = gb // start
    if start >= gb or gb % start or ratio & (ratio - 1):
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
        raise ConfigError(
            f"ramp.start_batch={cfg.ramp.start_batch}: the stage at global batch {batch}: {exc}"
        ) from None
    lr = scale_lr(cfg.optim, batch, steady.optimizer)[0]
    r = lr / steady.lr
    why["lr"] = f"{_fmt(lr)} = {_fmt(steady.lr)} x {_fmt(r)} (scaling rule at batch {batch})"
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


def _plan(
    cfg: RunConfig,
    world_size: int,
    epoch_samples: int,
    epoch_source: str,
    world_source: str,
    memory: dict[str, Any] | None,
    origin: tuple[int, int],
) -> BatchPlan:
    """The plan of one global batch (plan_batch without the ramp-up)."""
    if epoch_samples <= 0:
        raise ConfigError(f"data: the training split is empty ({epoch_samples} samples)")
    gb = cfg.global_batch
    recover, reasons_oom = oom_recovery(cfg)
    micro, accum, noise, reasons = split_for(cfg, gb, world_size, memory, recover)
    reasons["oom_recovery"] = reasons_oom
    reasons["global_batch"] = f"{gb} (global_batch)"
    if memory is not None:
        reasons["memory"] = memory["reason"]
    elif cfg.micro_batch != "auto":
        reasons["memory"] = "not probed: micro_batch is set explicitly"
    else:
        reasons["memory"] = "not probed (memory.probe=false): micro-batch capped by max_micro_batch"
    reasons["world_size"] = f"{world_size}{world_source}"
    optimizer, swapped, reasons["optimizer"] = choose_optimizer(cfg.optim, gb)
    lr, rule, reasons["lr"] = scale_lr(cfg.optim, gb, optimizer)
    decay_wd, wd_source = weight_decay(cfg.optim, swapped)
    reasons["weight_decay"] = f"{_fmt(decay_wd)} ({wd_source}; none on norm and bias parameters)"
    reasons["clip_grad_norm"] = clipping(cfg.optim.clip_grad_norm, gb / cfg.optim.ref_batch)

    sched: ScheduleConfig = cfg.schedule
    decay, power = sched.decay, sched.power
    warmup_epochs = sched.warmup_epochs
    if swapped:
        swap_power = OPTIMIZER_FACTS[optimizer].swap_poly_power
        assert swap_power is not None  # every swap target (lars, lamb) has one
        decay, power = "poly", swap_power
        warmup_epochs = cfg.optim.large_batch.warmup_epochs
        reasons["decay"] = f"poly power {_fmt(power)} ({optimizer} policy)"
    else:
        reasons["decay"] = f"{decay} (schedule.decay)"

    reasons["epoch_samples"] = f"{epoch_samples:,} samples per epoch{epoch_source}"
    total_exact = run_samples(cfg, epoch_samples)
    o_step, o_samples = origin
    steps = o_step + max(math.ceil((total_exact - o_samples) / gb), 0)
    total = o_samples + (steps - o_step) * gb
    reasons["steps"] = (
        f"{steps:,} = ceil({_fmt(cfg.trainer.epochs)} epochs x {epoch_samples:,} / {gb})"
    )
    if origin != (0, 0):
        reasons["steps"] = (
            f"{steps:,} = {o_step:,} steps ({o_samples:,} samples) with the checkpoint's global "
            f"batch + ceil(({_fmt(cfg.trainer.epochs)} epochs x {epoch_samples:,} - "
            f"{o_samples:,}) / {gb})"
        )
    if total != total_exact:
        reasons["steps"] += (
            f"; the last step runs {math.ceil(total - total_exact):,} samples into the "
            "next epoch's shuffle, so no sample of the last epoch is skipped"
        )

    base_lr, _ = base_lr_for(cfg.optim, optimizer)
    start = min(base_lr, lr) if sched.warmup_from == "ref" else 0.0
    warmup = round(warmup_epochs * epoch_samples)
    if warmup_epochs == 0:
        warmup, why = 0, "no warmup (warmup_epochs=0)"
    elif sched.warmup_from == "ref" and lr <= base_lr:
        warmup, why = 0, f"no warmup: lr {_fmt(lr)} is not above the reference lr"
    else:
        why = (
            f"{_fmt(warmup_epochs)} epochs = {warmup:,} samples ({warmup / gb:.1f} steps), "
            f"linear from {_fmt(start)} to {_fmt(lr)}"
        )
        if warmup > steps * gb:
            why += " (longer than the run: the peak lr is never reached)"
    reasons["warmup_samples"] = why

    milestones = tuple(round(m * epoch_samples) for m in sched.milestones)
    saves, reasons["checkpoints"] = checkpointing(cfg)
    seq = getattr(cfg.data, "seq_len", 0)  # sequence data: every sample is seq_len tokens
    if seq:
        reasons["tokens_per_batch"] = (
            f"{gb * seq:,} = {gb} sequences x {seq} tokens (data.seq_len); "
            f"{micro * seq:,} per micro-batch, {gb * seq * steps:,} in the run"
        )
    return BatchPlan(
        global_batch=gb,
        world_size=world_size,
        per_device_batch=gb // world_size,
        micro_batch=micro,
        accumulation=accum,
        optimizer=optimizer,
        lr_rule=rule,
        base_lr=base_lr,
        lr=lr,
        weight_decay=decay_wd,
        clip_grad_norm=cfg.optim.clip_grad_norm,
        warmup_samples=warmup,
        warmup_start_lr=start,
        decay=decay,
        decay_power=power,
        milestone_samples=milestones if decay == "step" else (),
        gamma=sched.gamma,
        end_lr=sched.end_lr,
        epoch_samples=epoch_samples,
        steps=steps,
        total_samples=total,
        origin_step=o_step,
        origin_samples=o_samples,
        oom_recovery=recover,
        checkpoints=saves,
        noise=noise,
        sample_tokens=seq,
        memory=memory or {},
        reasons=reasons,
    )


TABLE_ROWS = (
    "global_batch",
    "tokens_per_batch",
    "world_size",
    "memory",
    "per_device_batch",
    "micro_batch",
    "accumulation",
    "optimizer",
    "lr",
    "weight_decay",
    "clip_grad_norm",
    "warmup_samples",
    "decay",
    "epoch_samples",
    "steps",
    "oom_recovery",
    "checkpoints",
    "noise_scale",
    "ramp",
    "budget",
)


OPTIONAL_ROWS = ("ramp", "tokens_per_batch", "budget")  # shown when the run has them


def format_plan(plan: BatchPlan) -> str:
    """The plan as a table: one row per derived number, with its reason."""
    values = {
        "lr": _fmt(plan.lr),
        "weight_decay": _fmt(plan.weight_decay),
        "clip_grad_norm": _fmt(plan.clip_grad_norm) if plan.clip_grad_norm else "off",
        "warmup_samples": f"{plan.warmup_samples:,}",
        "epoch_samples": f"{plan.epoch_samples:,}",
        "steps": f"{plan.steps:,}",
        "memory": f"{plan.memory['cap']:,}" if plan.memory else "-",
        "oom_recovery": "on" if plan.oom_recovery else "off",
        "checkpoints": "on" if plan.checkpoints else "off",
        "noise_scale": plan.noise,
        "ramp": f"{plan.ramp[0].global_batch}->{plan.global_batch}" if plan.ramp else "-",
        **({"ramp": f"adaptive<={plan.adaptive_cap}"} if plan.adaptive_cap else {}),
        "tokens_per_batch": f"{plan.global_batch * plan.sample_tokens:,}",
    }
    rows = [
        (k, values[k] if k in values else str(getattr(plan, k)), plan.reasons.get(k, ""))
        for k in TABLE_ROWS
        if k not in OPTIONAL_ROWS or k in plan.reasons
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'':-<{w0 + w1 + 40}}", "batch plan", f"{'':-<{w0 + w1 + 40}}"]
    lines += [f"{k:<{w0}}  {v:>{w1}}  {why}" for k, v, why in rows]
    return "\n".join(lines)

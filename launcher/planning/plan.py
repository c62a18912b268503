"""The planner: plan_batch(PlanInput) -> BatchPlan (launcher/types/plan.py), every derived
training number with the reason it was chosen. Pure functions only.

global_batch = micro_batch x accumulation x world_size, exactly. LR, warmup and decay follow the
large-batch policy (DESIGN.md) and are defined in samples, so they do not move when world size,
micro-batch or accumulation do. Nothing is rounded silently: what does not divide raises with
both numbers and the nearest valid choices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, cast

from launcher.config.execution import TrainerConfig
from launcher.config.optimization import OptimConfig, ScheduleConfig
from launcher.config.optimizers import OPTIMIZER_FACTS
from launcher.config.ranges import COUNT
from launcher.config.schema import ConcreteConfig
from launcher.errors import ConfigError
from launcher.planning.adaptive import stage_plan
from launcher.planning.length import run_length, run_samples
from launcher.planning.ramp import ramp_batches, ramp_stages
from launcher.planning.rules import (
    base_lr_for,
    checkpointing,
    choose_optimizer,
    clipping,
    fmt,
    oom_recovery,
    scale_lr,
    weight_decay,
)
from launcher.planning.split import split_for
from launcher.planning.tokens import (
    length_key,
    require_in_samples,
    stated_in_tokens,
    tokens_per_sample,
)
from launcher.types.plan import AdaptiveStage, BatchPlan

MOST_OF_THE_RUN = 0.5  # a warmup over more than this share of the run's samples gets a note


@dataclass(frozen=True)
class PlanInput:
    """What a plan is made from: the run's config as the job trains with it (its quantities in
    samples: launcher/training/job.py concrete), the world size and the training split's size
    (each with where it comes from, for the reasons), the memory probe's report, and where the
    run stands: `origin` (step, samples) already done at another global batch (a global batch
    changed on resume), or an adaptive ramp's `stage` (None: its start)."""

    cfg: ConcreteConfig
    world_size: int
    epoch_samples: int
    _: KW_ONLY
    epoch_source: str = ""
    world_source: str = " processes"
    memory: dict[str, Any] | None = None  # launcher/memory/probe.py's report; None: not probed
    origin: tuple[int, int] = (0, 0)
    stage: AdaptiveStage | None = None


def plan_batch(given: PlanInput) -> BatchPlan:
    """The whole plan for one run. Raises ConfigError on anything that does not fit exactly.

    The memory report's `cap` is the largest micro-batch the device memory allows. With a ramp-up
    (ramp.start_batch) its stages come first (`ramp_stages`) and the plan's origin is where
    global_batch takes over. An adaptive ramp (ramp.mode=adaptive) plans the batch it trains now
    (`given.stage`, by default its start). Quantities stated in tokens are read as the samples
    they were converted into (launcher/planning/tokens.py); a config not converted is refused.
    """
    cfg = given.cfg
    require_in_samples(cfg)
    key = batch_key(cfg.global_batch, cfg.global_batch_tokens)
    _within_the_data(key, cfg.global_batch, cfg.trainer, given.epoch_samples)
    if cfg.ramp.mode == "adaptive":
        stage = given.stage or AdaptiveStage(cast(int, cfg.ramp.start_batch))
        steady = _plan(given, (0, 0))
        return _stopping(cfg.trainer, stage_plan(cfg, steady, stage, given.memory))
    return _stopping(cfg.trainer, _ramped(given))


def batch_key(global_batch: int, tokens: int | None) -> str:
    """How a config states its global batch: `global_batch=N`, or global_batch_tokens."""
    if tokens is None:
        return f"global_batch={global_batch}"
    return f"global_batch_tokens={tokens} ({global_batch:,} sequences)"


def _within_the_data(key: str, gb: int, trainer: TrainerConfig, epoch_samples: int) -> None:
    """Sizes the data allows: a step no larger than the whole run, an evaluation interval of at
    least one sample (a global batch of 10^12 would try to index 7 TiB; 0 would divide by 0)."""
    total = run_samples(trainer, epoch_samples)
    if epoch_samples < 1:  # said by _plan, which names the empty split
        return
    if total > COUNT:
        raise ConfigError(
            f"trainer.epochs={trainer.epochs:g}: {float(total):,.0f} samples ({epoch_samples:,} "
            f"per epoch), more than a run can count exactly (2^53); train fewer epochs"
        )
    if gb > total:
        length = f"trainer.epochs {trainer.epochs:g} x {epoch_samples:,} per epoch"
        if trainer.samples:
            length = "trainer.tokens" if trainer.tokens else "trainer.samples"
        raise ConfigError(
            f"{key}: larger than the whole run ({float(total):,.0f} samples = {length}); one "
            "step would train on more than the run has: lower it, or train longer"
        )
    if round(trainer.eval_every_epochs * epoch_samples) < 1:
        raise ConfigError(
            f"trainer.eval_every_epochs={trainer.eval_every_epochs:g}: less than one sample "
            f"of the {epoch_samples:,} per epoch; must be >= {1 / epoch_samples:.3g}"
        )


def _stopping(trainer: TrainerConfig, plan: BatchPlan) -> BatchPlan:
    """The plan with trainer.stop_after_samples' early end, if set."""
    stop = trainer.stop_after_samples
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
    cool = trainer.stop_cooldown_samples
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


def _ramped(given: PlanInput) -> BatchPlan:
    """plan_batch before the early stop: a fixed ramp-up's stages, then global_batch."""
    cfg, origin = given.cfg, given.origin
    if cfg.ramp.start_batch is None:
        return _plan(given, origin)
    batches = ramp_batches(cfg.ramp, cfg.global_batch)
    if origin != (0, 0):  # the global batch changed on resume, after the ramp-up (resume.check)
        plan = _plan(given, origin)
        why = f"{batches[0]} -> {cfg.global_batch}: done before the checkpoint resumed from"
        return dataclasses.replace(plan, reasons=plan.reasons | {"ramp": why})
    steady = _plan(given, origin)
    seq = tokens_per_sample(cfg.data)
    length = f"ramp.samples={cfg.ramp.samples}"
    if cfg.ramp.tokens:
        length = f"ramp.tokens={cfg.ramp.tokens} ({cfg.ramp.samples:,} sequences of {seq})"
    if cfg.ramp.samples >= steady.total_samples:
        raise ConfigError(
            f"{length}: the ramp-up must end before the run does "
            f"({steady.total_samples:,} samples); shorten it or train longer"
        )
    stages = ramp_stages(cfg, steady, batches, given.memory)
    end = stages[-1].steps, stages[-1].samples_at(stages[-1].steps)
    plan = _plan(given, end)
    gb, share = cfg.global_batch, cfg.ramp.samples / len(batches)
    reasons = plan.reasons | {
        "steps": f"{plan.steps:,} = {end[0]:,} ramp-up steps ({end[1]:,} samples) + "
        f"ceil(({run_length(cfg.trainer, given.epoch_samples, seq)} - {end[1]:,}) / {gb})",
        "ramp": "; ".join(
            f"{p.global_batch} (micro {p.micro_batch} x {p.accumulation}, lr {fmt(p.lr)}) for "
            f"steps {p.origin_step:,}-{p.steps - 1:,}"
            for p in stages
        )
        + f"; {gb} from step {end[0]:,} (sample {end[1]:,}): the batch doubles every "
        f"{share:,.6g} samples ({length}), each stage from the first "
        "step boundary after its share; LR = the plan's schedule x the scaling rule's ratio",
    }
    return dataclasses.replace(plan, ramp=stages, reasons=reasons)


def _memory_reason(micro_batch: int | str, memory: dict[str, Any] | None) -> str:
    if memory is not None:
        return str(memory["reason"])
    if micro_batch != "auto":
        return "not probed: micro_batch is set explicitly"
    return "not probed (memory.probe=false): micro-batch capped by max_micro_batch"


def _decay(
    optim: OptimConfig, sched: ScheduleConfig, optimizer: str, swapped: bool
) -> tuple[str, float, float, str]:
    """(decay, power, warmup epochs, reason): the schedule's, or the swapped-in optimizer's
    policy (poly decay, its own warmup)."""
    if not swapped:
        return sched.decay, sched.power, sched.warmup_epochs, f"{sched.decay} (schedule.decay)"
    power = OPTIMIZER_FACTS[optimizer].swap_poly_power
    assert power is not None  # every swap target (lars, lamb) has one
    why = f"poly power {fmt(power)} ({optimizer} policy)"
    return "poly", power, optim.large_batch.warmup_epochs, why


def _steps(
    gb: int, trainer: TrainerConfig, epoch_samples: int, origin: tuple[int, int], seq: int
) -> tuple[int, int, str]:
    """(steps, samples they consume, reason): the run's length at global_batch, from `origin`
    (step, samples) when a checkpoint at another global batch is resumed."""
    length = run_length(trainer, epoch_samples, seq)
    total_exact = run_samples(trainer, epoch_samples)
    o_step, o_samples = origin
    steps = o_step + max(math.ceil((total_exact - o_samples) / gb), 0)
    total = o_samples + (steps - o_step) * gb
    why = f"{steps:,} = ceil({length} / {gb})"
    if origin != (0, 0):
        why = (
            f"{steps:,} = {o_step:,} steps ({o_samples:,} samples) with the checkpoint's global "
            f"batch + ceil(({length} - {o_samples:,}) / {gb})"
        )
    if total != total_exact:
        why += (
            f"; the last step runs {math.ceil(total - total_exact):,} samples into the "
            "next epoch's shuffle, so no sample of the last epoch is skipped"
        )
    return steps, total, why


def _warmup_length(
    sched: ScheduleConfig, epochs: float, epoch_samples: int, seq: int
) -> tuple[int, str, str]:
    """(samples, in words, the key that says it) of the warmup: schedule.warmup_samples (or its
    tokens), else `epochs` (schedule.warmup_epochs, or the swapped optimizer's) x the epoch;
    no words when it is 0."""
    warmup = sched.warmup_samples
    if warmup is None:
        words = f"{fmt(epochs)} epochs = " if epochs else ""
        return round(epochs * epoch_samples), words, "warmup_epochs"
    if sched.warmup_tokens is not None:
        words = f"{sched.warmup_tokens:,} tokens / {seq} (schedule.warmup_tokens) = "
        return warmup, words if warmup else "", "schedule.warmup_tokens"
    return warmup, "schedule.warmup_samples = " if warmup else "", "schedule.warmup_samples"


def _warmup(
    sched: ScheduleConfig,
    gb: int,
    length: tuple[int, str, str],
    steps: int,
    start: float,
    lr: float,
) -> tuple[int, str]:
    """(warmup samples, reason): linear from `start` to the peak `lr` over `length` (samples,
    in words, key: _warmup_length); none when the peak is not above the reference LR
    (warmup_from=ref) or the length is 0."""
    warmup, words, key = length
    if not words:
        return 0, f"no warmup ({key}=0)"
    if sched.warmup_from == "ref" and start >= lr:
        return 0, f"no warmup: lr {fmt(lr)} is not above the reference lr"
    why = (
        f"{words}{warmup:,} samples ({warmup / gb:.1f} steps), "
        f"linear from {fmt(start)} to {fmt(lr)}"
    )
    if warmup > steps * gb:
        why += " (longer than the run: the peak lr is never reached)"
    elif warmup > steps * gb * MOST_OF_THE_RUN:
        why += (
            f" (most of the run: {warmup / gb:.1f} of its {steps:,} steps train below the peak "
            "lr; shorten the warmup or train longer)"
        )
    return warmup, why


def _plan(given: PlanInput, origin: tuple[int, int]) -> BatchPlan:
    """The plan of one global batch from `origin` (plan_batch without the ramp-up). (Over 60
    lines: 30 of them name the BatchPlan's fields; the rules themselves are the helpers above.)"""
    cfg, memory = given.cfg, given.memory
    world_size, epoch_samples = given.world_size, given.epoch_samples
    if epoch_samples <= 0:
        raise ConfigError(f"data: the training split is empty ({epoch_samples} samples)")
    gb = cfg.global_batch
    seq = tokens_per_sample(cfg.data)  # sequence data: every sample is seq_len tokens
    recover, reasons_oom = oom_recovery(cfg.trainer, cfg.backend)
    micro, accum, noise, reasons = split_for(cfg, gb, world_size, memory, recover)
    reasons["oom_recovery"] = reasons_oom
    reasons["global_batch"] = f"{gb} (global_batch)"
    if cfg.global_batch_tokens is not None:
        reasons["global_batch"] = (
            f"{cfg.global_batch_tokens:,} tokens / {seq} tokens per sequence = {gb:,} sequences "
            "(global_batch_tokens)"
        )
    reasons["memory"] = _memory_reason(cfg.micro_batch, memory)
    reasons["world_size"] = f"{world_size}{given.world_source}"
    optimizer, swapped, reasons["optimizer"] = choose_optimizer(cfg.optim, gb)
    lr, rule, reasons["lr"] = scale_lr(cfg.optim, gb, optimizer)
    decay_wd, wd_source = weight_decay(cfg.optim, swapped)
    reasons["weight_decay"] = f"{fmt(decay_wd)} ({wd_source}; none on norm and bias parameters)"
    reasons["clip_grad_norm"] = clipping(cfg.optim.clip_grad_norm, gb / cfg.optim.ref_batch)

    sched: ScheduleConfig = cfg.schedule
    decay, power, warmup_epochs, reasons["decay"] = _decay(
        cfg.optim, cfg.schedule, optimizer, swapped
    )
    reasons["epoch_samples"] = f"{epoch_samples:,} samples per epoch{given.epoch_source}"
    steps, total, reasons["steps"] = _steps(gb, cfg.trainer, epoch_samples, origin, seq)
    o_step, o_samples = origin
    base_lr, _ = base_lr_for(cfg.optim, optimizer)
    start = min(base_lr, lr) if sched.warmup_from == "ref" else 0.0
    length = _warmup_length(sched, warmup_epochs, epoch_samples, seq)
    warmup, reasons["warmup_samples"] = _warmup(sched, gb, length, steps, start, lr)

    milestones = tuple(round(m * epoch_samples) for m in sched.milestones)
    saves, reasons["checkpoints"] = checkpointing(cfg.checkpoint, cfg.backend)
    if seq:
        reasons["tokens_per_batch"] = (
            f"{gb * seq:,} = {gb} sequences x {seq} tokens ({length_key(cfg.data)}); "
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
        in_tokens=tuple(key for key, _, _ in stated_in_tokens(cfg)),
        memory=memory or {},
        reasons=reasons,
    )

"""A job's plan: the topology and BatchPlan for its concrete config (launcher/training/job.py
concrete), re-made as facts arrive (the data's
epoch, a checkpoint's stage, the measured memory); whether the memory probe sets the micro-batch;
the budget row judged from an earlier run beside the run folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from launcher.backends import check as check_backend
from launcher.batchsize.prior import budget, find_prior
from launcher.cluster.topology import Topology, resolve
from launcher.config.execution import MemoryConfig
from launcher.config.schema import ConcreteConfig, RunConfig
from launcher.data import build_splits, declared_epoch_samples, loading
from launcher.errors import ConfigError
from launcher.planning.plan import PlanInput, plan_batch
from launcher.training.budgeting import budget_config, budget_of, budget_plan
from launcher.types.plan import AdaptiveStage, BatchPlan


def plan_for(
    cfg: ConcreteConfig,
    launched: Topology,
    epoch: tuple[int, str] | None = None,
    memory: dict[str, Any] | None = None,
    origin: tuple[int, int] = (0, 0),
    stage: AdaptiveStage | None = None,
) -> tuple[Topology, BatchPlan]:
    """Topology and plan; the epoch size is the data config's declared one unless given.
    `stage`: an adaptive ramp's batch, origin and history (plan_batch)."""
    topology = resolve(cfg.cluster, launched, cfg.plan_only)
    samples, source = epoch if epoch is not None else declared_epoch_samples(cfg.data)
    if samples == 0:  # a stream without len() (data/stream.py): its epoch is the run's length
        samples, source = unsized_epoch(cfg.data, cfg.trainer, source)
    c = cfg.cluster
    if cfg.plan_only and c.declared_world_size is not None:
        each = "" if c.device_memory_gb == "auto" else f", {c.device_memory_gb:g} GiB each"
        shape = f"{c.nodes} nodes x {c.devices_per_node} {c.device} devices"
        where = f" = {shape} (cluster={c.name}{each})"
    else:
        where = f" {topology.device} process(es) on {topology.nodes} node(s), {topology.source}"
    budgeted = budget_of(cfg.data) > 0
    if budgeted:  # data.micro_batch_tokens: the budget cuts the per-device batch
        cfg = budget_config(cfg, topology.world_size)
    plan = plan_batch(
        PlanInput(
            cfg,
            topology.world_size,
            samples,
            epoch_source=source,
            world_source=where,
            memory=memory,
            origin=origin,
            stage=stage,
        )
    )
    check_backend(cfg, plan, topology.device)
    row = loading(cfg.data, topology.world_size)
    if row is not None:  # streamed or collated data: how it is read, what the probe measured
        plan = dataclasses.replace(plan, reasons=plan.reasons | {"data": row[1]}, data=row[0])
    if budgeted:
        from launcher.data.lengths import lengths  # heavy: torch

        plan = budget_plan(cfg.data, plan, lengths(build_splits(cfg.data).train))
    return topology, plan


def unsized_epoch(data: Any, trainer: Any, source: str) -> tuple[int, str]:
    """A stream without len(): one epoch is trainer.samples (of a concrete config: what
    trainer.tokens converts into, when it states the length)."""
    samples = trainer.samples
    if samples <= 0:
        target = getattr(data, "target", data)
        raise ConfigError(
            f"data._target_={target!r}: its training data is a stream without len(); state the "
            "run's length with trainer.samples=N or trainer.tokens=N (one pass of the stream)"
        )
    said = source[:-1] if source.endswith(")") else source
    key = "trainer.tokens" if trainer.tokens else "trainer.samples"  # the one stated
    return samples, f"{said}; one epoch = {key})"


def probes_memory(memory: MemoryConfig, micro_batch: int | str) -> bool:
    return memory.probe and micro_batch == "auto"


def with_budget(cfg: RunConfig, plan: BatchPlan, run_dir: Path) -> BatchPlan:
    """The plan with its budget row: are trainer.epochs enough at this batch, judged from the
    newest earlier run of the same workload next to run_dir (launcher/batchsize/prior.py)."""
    prior = find_prior(cfg, run_dir.parent, exclude=run_dir)
    if prior is None:
        return plan
    value, why = budget(prior, plan.global_batch, plan.total_samples, plan.epoch_samples)
    return dataclasses.replace(plan, budget=value, reasons=plan.reasons | {"budget": why})

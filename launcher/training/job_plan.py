"""A job's plan: the topology and BatchPlan for its concrete config (launcher/training/job.py
concrete) and the facts it is made from; whether the memory probe sets the micro-batch; the
budget row judged from an earlier run beside the run folder.

A plan is a function of the config, the processes and its Facts (the training split's size, the
memory report, where the run stands). A process plans a job once, and again only when a fact is
new; no plan repeats one from the same facts. The plans of one job, by process:

- the launching process (job.validate; every process of a launch runs it, workers included): 1,
  with the epoch the data config declares, for the processes that will train: the check before
  anything is written.
- plan_only (job.estimated_plan): validate's plan when it is handed down (launcher.run()), else 1
  with the declared epoch (a Hydra job, python -m launcher.slurm); then 1 with the memory
  estimated (fake tensors, the devices planned for) when the probe would set the micro-batch
  (memory.probe and micro_batch=auto). So launcher.run() under plan_only: 2 with that estimate,
  1 without.
- training (launcher/training/phases.py): set_up 1, with the epoch counted in the built data (a
  new fact beside the declared one: its number or its source); find_checkpoint 1 when the
  checkpoint moves the run's origin (a global batch changed on resume) or holds an adaptive
  ramp's stage, none when it resumes where the plan already stands; prepare 1 with the measured
  memory when the probe ran; 1 at each growth of an adaptive ramp. An out-of-memory re-split
  is no new plan: the loop halves the plan's micro-batch (launcher/planning/split.py
  shrink_micro_batch). So launcher.run() of a fresh run on one process: 3 with the probe (validate,
  set_up, prepare), 2 without.

A Hydra job (launcher/hydra_app.py) of a run, in the launching process (the basic launcher),
takes validate's concrete config and plan, as launcher.run() does: Hydra hands it the config the
launcher composed and checked (launcher/config/hydra_internals.py composing_once), so `python -m
launcher plan_only=true` composes once and plans 2 times with the estimate. A sweep's jobs, and
a job in a launcher plugin's process, make their own concrete config from the config Hydra
composed for them and plan it as above without a handed-down plan. python -m launcher.cbs plans
each branch once to check it, then trains it as above. tests/test_job_plan.py counts them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from launcher.backends import check as check_backend
from launcher.batchsize.prior import budget, find_prior
from launcher.cluster.topology import Topology, resolve
from launcher.config.execution import MemoryConfig
from launcher.config.schema import ConcreteConfig, RunConfig
from launcher.data import build_splits, loading
from launcher.errors import ConfigError
from launcher.planning.plan import PlanInput, plan_batch
from launcher.training.budgeting import budget_config, budget_of, budget_plan
from launcher.types.plan import AdaptiveStage, BatchPlan


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a job's plan is made from besides its config and the processes: the training split's
    size (samples per epoch, where that number comes from; 0: a stream without len()), the memory
    report (the probe's, or plan_only's estimate; None: none), and where the run stands: `origin`
    (step, samples) done at another global batch, an adaptive ramp's `stage` (plan_batch)."""

    epoch: tuple[int, str]
    memory: dict[str, Any] | None = None
    origin: tuple[int, int] = (0, 0)
    stage: AdaptiveStage | None = None


@dataclasses.dataclass(frozen=True)
class Planned:
    """A job's plan, with the facts it was made from and the topology it plans for."""

    facts: Facts
    topology: Topology
    plan: BatchPlan


def plan_for(cfg: ConcreteConfig, launched: Topology, facts: Facts) -> Planned:
    """The topology and plan for `facts` (the one place a job's plan is made)."""
    topology = resolve(cfg.cluster, launched, cfg.plan_only)
    samples, source = facts.epoch
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
            memory=facts.memory,
            origin=facts.origin,
            stage=facts.stage,
        )
    )
    check_backend(cfg, plan, topology.device)
    row = loading(cfg.data, topology.world_size)
    if row is not None:  # streamed or collated data: how it is read, what the probe measured
        plan = dataclasses.replace(plan, reasons=plan.reasons | {"data": row[1]}, data=row[0])
    if budgeted:
        from launcher.data.lengths import lengths  # heavy: torch

        plan = budget_plan(cfg.data, plan, lengths(build_splits(cfg.data).train))
    return Planned(facts, topology, plan)


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

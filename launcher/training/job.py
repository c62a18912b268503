"""One job, end to end: topology -> plan -> run directory -> build -> train -> outputs.

Every job of a launch is validated (its config, plan, trackers and run folder) before any starts;
then each runs here (execute: its phases, launcher/training/phases.py), or trainer.devices workers
are started that run them. The plan is launcher/training/job_plan.py's, the run folder
launcher/training/run_folder.py's.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Literal

from launcher import faults, log
from launcher.checkpoint.lock import NAME, acquire, release, shared
from launcher.checkpoint.paths import check_writable
from launcher.cluster import preemption
from launcher.cluster.spawn import spawn
from launcher.cluster.topology import Topology, from_env, local_processes, resolve, slurm_env
from launcher.config.compose import compose_dict, config_dir_args, split_sweep
from launcher.config.schema import ConcreteConfig, RunConfig, to_run_config
from launcher.data import data_spec, declared_epoch_samples
from launcher.errors import ConfigError
from launcher.planning.render import format_plan
from launcher.planning.split import batch_step
from launcher.planning.tokens import in_samples
from launcher.training.job_plan import Facts, Planned, plan_for, probes_memory, with_budget
from launcher.training.metrics import check_trackers
from launcher.training.run_folder import (
    create_run_dir,
    job_run_dir,
    restart_note,
    reuses_run_dir,
    run_stamp,
    write_plan_files,
)
from launcher.types.plan import BatchPlan


def concrete(cfg: RunConfig, launched: Topology) -> ConcreteConfig:
    """The config a job trains with, made once per process and job where the process takes the
    job in (validate, a Hydra job, python -m launcher.slurm, a branch of python -m launcher.cbs):
    its device `auto`s resolved for the device that trains it (on_device), its quantities stated
    in tokens converted into samples (launcher/planning/tokens.py), a global batch in tokens
    refused with the nearest values that split over the processes that train it."""
    topology = resolve(cfg.cluster, launched, cfg.plan_only)
    cfg = on_device(cfg, topology.device)
    return ConcreteConfig(in_samples(cfg, batch_step(topology.world_size, cfg.micro_batch)))


def on_device(cfg: RunConfig, device: str) -> RunConfig:
    """The config with its device-dependent `auto` settings made concrete (config.yaml records
    them): mixed precision bf16 on CUDA (fp16 on GPUs without bf16), none on CPU; channels-last
    on CUDA."""
    backend, trainer = cfg.backend, cfg.trainer
    if backend.mixed_precision == "auto":
        precision = _auto_precision(device)  # fp16 on a GPU without bf16, which FsdpConfig lacks
        backend = dataclasses.replace(backend, mixed_precision=precision)  # type: ignore[arg-type]
    if trainer.channels_last == "auto":
        trainer = dataclasses.replace(trainer, channels_last=device == "cuda")
    return dataclasses.replace(cfg, backend=backend, trainer=trainer)


def _auto_precision(device: str) -> Literal["no", "bf16", "fp16"]:
    if device != "cuda":
        return "no"
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"  # and for plan_only on a declared CUDA cluster without a GPU here


def estimated_memory(cfg: RunConfig, topology: Topology, plan: BatchPlan) -> dict[str, Any]:
    """plan_only: the profile estimated with fake tensors, against the declared device memory."""
    from launcher.memory.probe import estimated_cap  # heavy: torch
    from launcher.memory.profile import GB, free_bytes  # heavy: torch

    declared = cfg.cluster.device_memory_gb
    if declared == "auto":
        device_bytes = free_bytes(topology.device, topology.local_world_size)
    else:
        device_bytes = int(declared * GB)
    return estimated_cap(cfg, data_spec(cfg.data), plan, device_bytes)[1]


@dataclasses.dataclass(frozen=True)
class ValidatedLaunch:
    """A validated launch: every job's overrides, concrete config, run folder and plan (from the
    epoch its data declares), and the processes."""

    overrides: list[list[str]]
    configs: list[ConcreteConfig]
    run_dirs: list[Path]
    planned: list[Planned]
    launched: Topology  # what trains: the processes trainer.devices starts, or what started us
    workers: int  # trainer.devices workers to start on this machine (0: this process trains)


def validate(
    overrides: list[str],
    multirun: bool,
    config_dir: Path | None = None,
    provided: dict[str, dict[str, Any]] | None = None,
    launched: Topology | None = None,
    chosen: str | None = None,
) -> ValidatedLaunch:
    """Compose and check every job before anything is written: its config, made concrete
    (`concrete`), its plan for the processes that will train it (`launched`: those a Hydra
    launcher plugin will start, else this process's), its trackers, its run folder. `chosen`:
    the run folder the command line chose, set on each job's composed config (launcher/hydra_app.py:
    Hydra composes it as its run folder, which the job takes as its run_dir)."""
    jobs = split_sweep(overrides) if multirun else [overrides]
    placed = {} if chosen is None else {"run_dir": chosen}
    composed = [
        to_run_config(compose_dict(job, config_dir) | (provided or {}) | placed) for job in jobs
    ]
    for key in ("backend", "trainer.devices"):
        if len({_get(cfg, key) for cfg in composed}) > 1:
            raise ConfigError(
                f"-m: a sweep cannot vary {key} (it is fixed per process); launch one sweep per "
                "setting"
            )
    os.environ.update(slurm_env(os.environ))  # srun per device: torch's variables from Slurm's
    launched = launched or from_env()
    workers = max(
        local_processes(cfg.trainer, cfg.cluster, launched, _visible_gpus(launched))
        for cfg in composed
    )
    # plan_only plans for the workers without starting them: the dry run is the real run
    workers_started = 0 if all(cfg.plan_only for cfg in composed) else workers
    if workers_started and provided:
        raise ConfigError(
            f"trainer.devices={composed[0].trainer.devices}: would start {workers} workers as "
            f"`python -m launcher`, which cannot rebuild the {', '.join(provided)} handed to "
            f"launcher.run(); start your script on every rank instead (torchrun --nproc_per_node "
            f"{workers} your_script.py), or set trainer.devices=1"
        )
    if workers:
        launched = Topology(workers, 0, 0, workers, launched.device, "trainer.devices", True)
    configs = [concrete(c, launched) for c in composed]
    stamp = run_stamp() if any(cfg.run_dir is None for cfg in configs) else ""
    run_dirs = [
        job_run_dir(cfg.run_dir, cfg.recipe, stamp, i if multirun else None)
        for i, cfg in enumerate(configs)
    ]
    planned = []
    for cfg, run_dir in zip(configs, run_dirs, strict=True):
        planned.append(plan_for(cfg, launched, Facts(declared_epoch_samples(cfg.data))))
        check_trackers(cfg.trainer.trackers)
        if launched.rank == 0:  # one process checks: ranks sharing a file system would race
            _check_folders(cfg, run_dir)
        if (run_dir / "plan.json").exists() and (cfg.resume == "never" or cfg.plan_only):
            raise ConfigError(
                f"run_dir={str(run_dir)!r}: already holds a run; choose a new one (or resume=auto "
                "to continue it)"
            )
    return ValidatedLaunch(jobs, configs, run_dirs, planned, launched, workers_started)


def _check_folders(cfg: RunConfig, run_dir: Path) -> None:
    """The folders the job writes can be made and written (launcher/checkpoint/paths.py)."""
    check_writable(run_dir, "run_dir")
    if probes_memory(cfg.memory, cfg.micro_batch) and cfg.memory.cache != "off":
        check_writable(cfg.memory.cache_dir, "memory.cache_dir")
    cache_dir = getattr(cfg.data, "cache_dir", None)
    if isinstance(cache_dir, str):
        check_writable(cache_dir, "data.cache_dir")


def launch(
    overrides: list[str],
    multirun: bool,
    config_dir: Path | None = None,
    provided: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """validate, then run the jobs in order in this process (or start trainer.devices workers on
    this machine that do). `provided`: config nodes that replace whole groups (launcher.run's
    objects). Returns each job's final evaluation and run_dir. The command line goes through
    launcher/hydra_app.py instead, which hands each job to Hydra."""
    jobs = validate(overrides, multirun, config_dir, provided)
    if jobs.workers:
        folder = jobs.run_dirs[0].parent if multirun else jobs.run_dirs[0]
        locked = jobs.configs[0].run_dir is not None  # a default folder is new anyway
        if locked:
            acquire(folder)
        try:
            args = [*config_dir_args(config_dir), *(["-m"] * multirun), *overrides]
            start_workers(jobs.workers, args, folder if locked else None)
        finally:
            release(folder.absolute() / NAME, os.getpid())
        return []
    results = []
    log.set_rank(jobs.launched.rank)
    for i, (cfg, run_dir, planned) in enumerate(
        zip(jobs.configs, jobs.run_dirs, jobs.planned, strict=True)
    ):
        if multirun:
            log.info(f"[multirun] job {i}: {' '.join(jobs.overrides[i])}")
        note = restart_note(cfg.run_dir)
        if note and jobs.launched.rank == 0:
            log.warn(note)
        if not reuses_run_dir(cfg.run_dir) or jobs.launched.rank > 0:  # a new folder: unlocked
            results.append(execute(cfg, jobs.launched, run_dir, planned))
            continue
        acquire(run_dir)
        try:
            results.append(execute(cfg, jobs.launched, run_dir, planned))
        finally:
            release(run_dir.absolute() / NAME, os.getpid())
    return results


def start_workers(workers: int, args: list[str], folder: Path | None) -> None:
    """`python -m launcher ARGS` as `workers` local processes (launcher/cluster/spawn.py), which
    share this process's lock of `folder` (None: it holds none)."""
    if "launcher.data.user" in sys.modules:  # the plan counted your data; workers build theirs
        sys.modules["launcher.data.user"].release()
    spawn(workers, args, shared(folder) if folder is not None else None)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _visible_gpus(launched: Topology) -> int:
    if launched.device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def estimated_plan(
    cfg: ConcreteConfig, launched: Topology, planned: Planned | None = None
) -> tuple[Topology, BatchPlan]:
    """The plan_only plan: for the declared cluster, with the memory estimated, not measured.
    `planned`: validate's plan of this job (the same facts: the declared epoch), continued from."""
    if planned is None:  # a text corpus is counted by listing its files: once
        planned = plan_for(cfg, launched, Facts(declared_epoch_samples(cfg.data)))
    if probes_memory(cfg.memory, cfg.micro_batch):
        memory = estimated_memory(cfg, planned.topology, planned.plan)
        planned = plan_for(cfg, launched, dataclasses.replace(planned.facts, memory=memory))
    else:  # the estimate's steps would have checked that model, data and loss fit together
        from launcher.memory.probe import check_fit  # heavy: torch

        check_fit(cfg, data_spec(cfg.data), planned.plan, planned.topology.device)
    return planned.topology, planned.plan


def execute(
    cfg: ConcreteConfig, launched: Topology, run_dir: Path, planned: Planned | None = None
) -> dict[str, Any]:
    """Plan, and unless plan_only, train. Returns the final evaluation (empty under plan_only).
    `cfg` is the job's concrete config (`concrete`), as config.yaml and the checkpoints record
    it; `planned`, validate's plan of it, which plan_only continues from (training plans from the
    data it builds: launcher/training/job_plan.py)."""
    log.set_rank(launched.rank)
    if cfg.plan_only:
        topology, plan = estimated_plan(cfg, launched, planned)
        plan = with_budget(cfg, plan, run_dir)
        run_dir = create_run_dir(run_dir, reuses_run_dir(cfg.run_dir))
        write_plan_files(run_dir, cfg, plan, topology.device)
        log.info(f"{format_plan(plan)}\n\nplan written to {run_dir}")
        return {"run_dir": str(run_dir)}
    from launcher.training.phases import train_job  # heavy: torch

    faults.waits_for(preemption.received)  # a test's WAIT ends on a signal the job received
    with preemption.handled():
        return train_job(cfg, launched, run_dir)

"""One job, end to end: topology -> plan -> run directory -> build -> train -> outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from launcher import faults, log
from launcher.backends import check as check_backend
from launcher.cluster.topology import Topology, resolve
from launcher.config.execution import MemoryConfig
from launcher.config.schema import RunConfig, to_dict
from launcher.data import declared_epoch_samples, loading
from launcher.errors import ConfigError
from launcher.planning.plan import BatchPlan, plan_batch
from launcher.planning.render import format_plan
from launcher.training.budgeting import budget_config, budget_of, budget_plan
from launcher.training.metrics import check_trackers

RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # torchrun --rdzv-id, in a folder name


def plan_for(
    cfg: RunConfig,
    launched: Topology,
    epoch: tuple[int, str] | None = None,
    memory: dict | None = None,
    origin: tuple[int, int] = (0, 0),
    stage: tuple | None = None,
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
        cfg,
        topology.world_size,
        samples,
        epoch_source=source,
        world_source=where,
        memory=memory,
        origin=origin,
        stage=stage,
    )
    check_backend(cfg, plan, topology.device)
    row = loading(cfg.data, topology.world_size)
    if row is not None:  # streamed or collated data: how it is read, what the probe measured
        plan = dataclasses.replace(plan, reasons=plan.reasons | {"data": row[1]}, data=row[0])
    if budgeted:
        from launcher.data import build_splits
        from launcher.data.lengths import lengths

        plan = budget_plan(cfg.data, plan, lengths(build_splits(cfg.data).train))
    return topology, plan


def on_device(cfg: RunConfig, device: str) -> RunConfig:
    """The config with its device-dependent `auto` settings made concrete (config.yaml records
    them): mixed precision bf16 on CUDA (fp16 on GPUs without bf16), none on CPU; channels-last
    on CUDA."""
    backend, trainer = cfg.backend, cfg.trainer
    if backend.mixed_precision == "auto":
        backend = dataclasses.replace(backend, mixed_precision=_auto_precision(device))
    if trainer.channels_last == "auto":
        trainer = dataclasses.replace(trainer, channels_last=device == "cuda")
    return dataclasses.replace(cfg, backend=backend, trainer=trainer)


def _auto_precision(device: str) -> str:
    if device != "cuda":
        return "no"
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"  # and for plan_only on a declared CUDA cluster without a GPU here


def probes_memory(memory: MemoryConfig, micro_batch: int | str) -> bool:
    return memory.probe and micro_batch == "auto"


def estimated_memory(cfg: RunConfig, topology: Topology, plan: BatchPlan) -> dict:
    """plan_only: the profile estimated with fake tensors, against the declared device memory."""
    from launcher.data import data_spec
    from launcher.memory.probe import estimated_cap
    from launcher.memory.profile import GB, free_bytes

    declared = cfg.cluster.device_memory_gb
    if declared == "auto":
        device_bytes = free_bytes(topology.device, topology.local_world_size)
    else:
        device_bytes = int(declared * GB)
    return estimated_cap(cfg, data_spec(cfg.data), plan, device_bytes)[1]


def job_run_dir(run_dir: str | None, recipe: str, stamp: str, job: int | None) -> Path:
    """run_dir, or outputs/<recipe>/<stamp>; in a sweep (job set) one numbered folder per job."""
    if job is None:
        return Path(run_dir or Path("outputs") / recipe / stamp)
    return Path(run_dir or Path("outputs") / recipe / f"multirun-{stamp}") / str(job)


def run_stamp() -> str:
    """The default run folder's name: slurm-<job id> under Slurm (a requeued job finds its run
    again and resumes), torchrun-<rendezvous id> in a worker of torchrun given --rdzv-id (an
    elastic restart finds its run again), else the launch time."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}"
    run = elastic_run()
    return f"torchrun-{run}" if run else time.strftime("%Y-%m-%d_%H-%M-%S")


def elastic_run() -> str | None:
    """torchrun's rendezvous id (TORCHELASTIC_RUN_ID, the same in every restart of its workers),
    when it names a run: not torchrun's default `none` (every run without --rdzv-id has it), and
    not in a trainer.devices worker (its agent chose the folder)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run or run == "none" or "LAUNCHER_SPAWNED" in os.environ:
        return None
    if not RUN_ID.fullmatch(run):
        raise ConfigError(
            f"TORCHELASTIC_RUN_ID={run!r} (torchrun --rdzv-id): names the default run folder "
            "(torchrun-<id>); use 1-128 letters, digits, '.', '_' or '-', not starting with '.' "
            "or '-' (or give run_dir)"
        )
    return run


def restart_note(run_dir: str | None) -> str | None:
    """What to say when torch's elastic agent restarted the workers of a run whose default
    folder cannot be found again (no --rdzv-id, not under Slurm): it starts over in a new one."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or "LAUNCHER_SPAWNED" in os.environ or reuses_run_dir(run_dir):
        return None
    return (
        f"launcher: torchrun restarted this run's workers (restart {restart}) without --rdzv-id: "
        "its default run folder is a new one, so it starts over; give torchrun --rdzv-id=NAME "
        "or run_dir=DIR for restarts that continue the same run"
    )


def reuses_run_dir(run_dir: str | None) -> bool:
    """An explicit run_dir, or the Slurm job's or the elastic run's: used as it is, never given a
    -2 suffix."""
    return run_dir is not None or "SLURM_JOB_ID" in os.environ or elastic_run() is not None


@dataclasses.dataclass(frozen=True)
class Jobs:
    """A validated launch: every job's overrides, config and run folder, and the processes."""

    overrides: list[list[str]]
    configs: list[RunConfig]
    run_dirs: list[Path]
    launched: Topology  # what trains: the processes trainer.devices starts, or what started us
    workers: int  # trainer.devices workers to start on this machine (0: this process trains)


def validate(
    overrides: list[str],
    multirun: bool,
    config_dir: Path | None = None,
    provided: dict[str, dict] | None = None,
    launched: Topology | None = None,
) -> Jobs:
    """Compose and check every job before anything is written: its config, its plan for the
    processes that will train it (`launched`: those a Hydra launcher plugin will start, else
    this process's), its trackers, its run folder."""
    from launcher.cluster.topology import from_env, local_processes, slurm_env
    from launcher.config.compose import compose_dict, split_sweep
    from launcher.config.schema import to_run_config

    jobs = split_sweep(overrides) if multirun else [overrides]
    configs = [to_run_config(compose_dict(job, config_dir) | (provided or {})) for job in jobs]
    for key in ("backend", "trainer.devices"):
        if len({_get(cfg, key) for cfg in configs}) > 1:
            raise ConfigError(
                f"-m: a sweep cannot vary {key} (it is fixed per process); launch one sweep per "
                "setting"
            )
    os.environ.update(slurm_env(os.environ))  # srun per device: torch's variables from Slurm's
    launched = launched or from_env()
    workers = max(
        local_processes(cfg.trainer, cfg.cluster, launched, _visible_gpus(launched))
        for cfg in configs
    )
    # plan_only plans for the workers without starting them: the dry run is the real run
    workers_started = 0 if all(cfg.plan_only for cfg in configs) else workers
    if workers_started and provided:
        raise ConfigError(
            f"trainer.devices={configs[0].trainer.devices}: would start {workers} workers as "
            f"`python -m launcher`, which cannot rebuild the {', '.join(provided)} handed to "
            f"launcher.run(); start your script on every rank instead (torchrun --nproc_per_node "
            f"{workers} your_script.py), or set trainer.devices=1"
        )
    if workers:
        launched = Topology(workers, 0, 0, workers, launched.device, "trainer.devices", True)
    configs = [on_device(c, resolve(c.cluster, launched, c.plan_only).device) for c in configs]
    stamp = run_stamp() if any(cfg.run_dir is None for cfg in configs) else ""
    run_dirs = [
        job_run_dir(cfg.run_dir, cfg.recipe, stamp, i if multirun else None)
        for i, cfg in enumerate(configs)
    ]
    for cfg, run_dir in zip(configs, run_dirs, strict=True):
        plan_for(cfg, launched)
        check_trackers(cfg.trainer.trackers)
        if launched.rank == 0:  # one process checks: ranks sharing a file system would race
            _check_folders(cfg, run_dir)
        if (run_dir / "plan.json").exists() and (cfg.resume == "never" or cfg.plan_only):
            raise ConfigError(
                f"run_dir={str(run_dir)!r}: already holds a run; choose a new one (or resume=auto "
                "to continue it)"
            )
    return Jobs(jobs, configs, run_dirs, launched, workers_started)


def _check_folders(cfg: RunConfig, run_dir: Path) -> None:
    """The folders the job writes can be made and written (launcher/checkpoint/paths.py)."""
    from launcher.checkpoint.paths import check_writable

    check_writable(run_dir, "run_dir")
    if probes_memory(cfg.memory, cfg.micro_batch) and cfg.memory.cache != "off":
        check_writable(cfg.memory.cache_dir, "memory.cache_dir")
    if isinstance(getattr(cfg.data, "cache_dir", None), str):
        check_writable(cfg.data.cache_dir, "data.cache_dir")


def launch(
    overrides: list[str],
    multirun: bool,
    config_dir: Path | None = None,
    provided: dict[str, dict] | None = None,
) -> list[dict[str, Any]]:
    """validate, then run the jobs in order in this process (or start trainer.devices workers on
    this machine that do). `provided`: config nodes that replace whole groups (launcher.run's
    objects). Returns each job's final evaluation and run_dir. The command line goes through
    launcher/hydra_app.py instead, which hands each job to Hydra."""
    from launcher.checkpoint.lock import NAME, acquire, release
    from launcher.config.compose import config_dir_args

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
    for i, (cfg, run_dir) in enumerate(zip(jobs.configs, jobs.run_dirs, strict=True)):
        if multirun:
            log.info(f"[multirun] job {i}: {' '.join(jobs.overrides[i])}")
        note = restart_note(cfg.run_dir)
        if note and jobs.launched.rank == 0:
            log.warn(note)
        if not reuses_run_dir(cfg.run_dir) or jobs.launched.rank > 0:  # a new folder: unlocked
            results.append(execute(cfg, jobs.launched, run_dir))
            continue
        acquire(run_dir)
        try:
            results.append(execute(cfg, jobs.launched, run_dir))
        finally:
            release(run_dir.absolute() / NAME, os.getpid())
    return results


def start_workers(workers: int, args: list[str], folder: Path | None) -> None:
    """`python -m launcher ARGS` as `workers` local processes (launcher/cluster/spawn.py), which
    share this process's lock of `folder` (None: it holds none)."""
    from launcher.checkpoint.lock import shared
    from launcher.cluster.spawn import spawn

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


def create_run_dir(path: Path, explicit: bool) -> Path:
    """Create the run directory; a default one that exists already gets a -2, -3 ... suffix."""
    if explicit:
        path.mkdir(parents=True, exist_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def write_plan_files(run_dir: Path, cfg: RunConfig, plan: BatchPlan, device: str) -> None:
    """config.yaml, plan.json and, for DeepSpeed, the ds_config.json the plan implies."""
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    plan_json = json.dumps(dataclasses.asdict(plan), indent=2, allow_nan=False)  # valid JSON
    (run_dir / "plan.json").write_text(plan_json + "\n")
    from launcher.backends import write_config

    write_config(run_dir, cfg, plan, device)


def with_budget(cfg: RunConfig, plan: BatchPlan, run_dir: Path) -> BatchPlan:
    """The plan with its budget row: are trainer.epochs enough at this batch, judged from the
    newest earlier run of the same workload next to run_dir (launcher/planning/prior.py)."""
    from launcher.planning.prior import budget, find_prior

    prior = find_prior(cfg, run_dir.parent, exclude=run_dir)
    if prior is None:
        return plan
    value, why = budget(prior, plan.global_batch, plan.total_samples, plan.epoch_samples)
    return dataclasses.replace(plan, budget=value, reasons=plan.reasons | {"budget": why})


def unsized_epoch(data: Any, trainer: Any, source: str) -> tuple[int, str]:
    """A stream without len(): one epoch is trainer.samples (trainer.tokens, converted)."""
    from launcher.planning.tokens import tokens_per_sample

    per = tokens_per_sample(data)
    samples = trainer.samples or (trainer.tokens // per if per else 0)
    if samples <= 0:
        target = getattr(data, "target", data)
        raise ConfigError(
            f"data._target_={target!r}: its training data is a stream without len(); state the "
            "run's length with trainer.samples=N or trainer.tokens=N (one pass of the stream)"
        )
    said = source[:-1] if source.endswith(")") else source
    key = "trainer.tokens" if trainer.tokens else "trainer.samples"  # the one stated
    return samples, f"{said}; one epoch = {key})"


def estimated_plan(cfg: RunConfig, launched: Topology) -> tuple[Topology, BatchPlan]:
    """The plan_only plan: for the declared cluster, with the memory estimated, not measured."""
    cfg = on_device(cfg, resolve(cfg.cluster, launched, cfg.plan_only).device)
    epoch = declared_epoch_samples(cfg.data)  # once: a text corpus is counted by listing files
    topology, plan = plan_for(cfg, launched, epoch)
    if probes_memory(cfg.memory, cfg.micro_batch):
        _, plan = plan_for(cfg, launched, epoch, estimated_memory(cfg, topology, plan))
    else:  # the estimate's steps would have checked that model, data and loss fit together
        from launcher.data import data_spec
        from launcher.memory.probe import check_fit

        check_fit(cfg, data_spec(cfg.data), plan, topology.device)
    return topology, plan


def execute(cfg: RunConfig, launched: Topology, run_dir: Path) -> dict[str, Any]:
    """Plan, and unless plan_only, train. Returns the final evaluation (empty under plan_only).
    The job's config is the one it trains with: its device `auto`s resolved, its quantities
    stated in tokens converted into samples (launcher/planning/tokens.py; validate's plans
    refused those that do not convert), as config.yaml and the checkpoints record it."""
    from launcher.planning.tokens import in_samples

    log.set_rank(launched.rank)
    cfg = in_samples(on_device(cfg, resolve(cfg.cluster, launched, cfg.plan_only).device))
    if cfg.plan_only:
        topology, plan = estimated_plan(cfg, launched)
        plan = with_budget(cfg, plan, run_dir)
        run_dir = create_run_dir(run_dir, reuses_run_dir(cfg.run_dir))
        write_plan_files(run_dir, cfg, plan, topology.device)
        log.info(f"{format_plan(plan)}\n\nplan written to {run_dir}")
        return {"run_dir": str(run_dir)}
    from launcher.cluster import preemption
    from launcher.training.phases import train_job

    faults.waits_for(preemption.received)  # a test's WAIT ends on a signal the job received
    with preemption.handled():
        return train_job(cfg, launched, run_dir)

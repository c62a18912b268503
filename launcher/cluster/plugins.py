"""Hydra's plugins that run a sweep (`-m`): the launchers (where its jobs run) and sweepers the
launcher supports, what each can run, and submitit_slurm's Slurm job from the cluster config.

A submitit_slurm job trains on the cluster's nodes x devices, one Slurm task per device
(topology.slurm_env turns srun's variables into torch's); its hydra.launcher.* settings come from
cluster.* and slurm.* (FROM_CLUSTER), with the same sbatch options as the scripts of
launcher/cluster/sbatch.py, so they are refused on the command line.
"""

from __future__ import annotations

from collections.abc import Sequence

from launcher.cluster.sbatch import check_shape, resources
from launcher.cluster.topology import Topology
from launcher.config.placement import ClusterConfig
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError

LAUNCHERS = {  # the hydra/launcher options a sweep can use: where they run each job
    "basic": "one after another in this process",
    "joblib": "in parallel, in worker processes on this machine (one process per job)",
    "submitit_local": "in parallel, as local processes (one process per job)",
    "submitit_slurm": "as Slurm jobs, each on the cluster's nodes x devices",
}
SWEEPERS = ("basic", "optuna")
FROM_CLUSTER = {  # hydra.launcher keys the launcher sets for submitit_slurm: where they come from
    "nodes": "cluster.nodes",
    "tasks_per_node": "cluster.devices_per_node",
    "gpus_per_node": "cluster.devices_per_node",
    "cpus_per_task": "slurm.cpus_per_task",
    "mem_gb": "slurm.mem",
    "mem_per_gpu": "slurm.mem_per_gpu",
    "timeout_min": "slurm.time",
    "partition": "slurm.partition",
    "account": "slurm.account",
    "signal_delay_s": "slurm.signal_seconds",
    "additional_parameters": "slurm.extra",
}


def check_choice(launcher: str, sweeper: str, multirun: bool) -> None:
    """Refuse a hydra/launcher or hydra/sweeper that is not supported, or given without -m (a
    single run ignores it)."""
    if launcher not in LAUNCHERS:
        ok = "; ".join(f"{name}: {how}" for name, how in LAUNCHERS.items())
        raise ConfigError(f"hydra/launcher={launcher!r}: not supported; choose {ok}")
    if sweeper not in SWEEPERS:
        raise ConfigError(
            f"hydra/sweeper={sweeper!r}: not supported; choose basic (a grid) or optuna (a search)"
        )
    for key, name in (("hydra/launcher", launcher), ("hydra/sweeper", sweeper)):
        if name != "basic" and not multirun:
            raise ConfigError(
                f"{key}={name}: runs the jobs of a sweep; add -m (a single run ignores it)"
            )


def check_launched(launcher: str, launched: Topology) -> None:
    """A launcher other than basic starts each job's processes itself: refuse it in a process
    that torchrun, accelerate, deepspeed or srun started (`launched`: this process's topology)."""
    if launcher != "basic" and launched.started:
        raise ConfigError(
            f"hydra/launcher={launcher}: starts each job's processes itself; run the sweep as a "
            "plain python -m launcher -m, not under torchrun, accelerate, deepspeed or srun"
        )


def check_processes(launcher: str, workers: int, world_size: int) -> None:
    """joblib and submitit_local run one process per job: refuse jobs of several (trainer.devices
    workers, or a world the job was started in)."""
    if launcher in ("joblib", "submitit_local") and (workers or world_size > 1):
        raise ConfigError(
            f"hydra/launcher={launcher}: runs one process per job; for jobs of "
            f"{max(workers, world_size)} processes use hydra/launcher=basic "
            "(trainer.devices) or submitit_slurm"
        )


def slurm_shape(cluster: ClusterConfig) -> Topology:
    """The processes each submitit_slurm job trains on: the cluster's nodes x devices, one Slurm
    task per device."""
    check_shape(cluster)
    world = int(cluster.nodes) * int(cluster.devices_per_node)
    source = "hydra/launcher=submitit_slurm"
    return Topology(world, 0, 0, int(cluster.devices_per_node), cluster.device, source, True)


def submitit_settings(configs: Sequence[RunConfig], overrides: list[str]) -> list[str]:
    """hydra.launcher.* for submitit_slurm, from the jobs' cluster and slurm settings (one
    launcher config per sweep: they cannot vary); the same sbatch options the templates get.
    `overrides`: the command line's, which must not set them."""
    first = configs[0]
    for cfg in configs[1:]:
        for key in ("cluster", "slurm"):
            if getattr(cfg, key) != getattr(first, key):
                raise ConfigError(
                    f"-m: with hydra/launcher=submitit_slurm a sweep cannot vary {key}.* (one "
                    "Slurm job shape per sweep); launch one sweep per setting"
                )
    for key, source in FROM_CLUSTER.items():
        given = (o.partition("=")[0].lstrip("+").split(".") for o in overrides)
        if any(parts[:3] == ["hydra", "launcher", key] for parts in given):
            raise ConfigError(
                f"hydra.launcher.{key}: the launcher sets it from {source}; set that instead"
            )
    c, s = first.cluster, first.slurm
    tasks = int(c.devices_per_node)
    found: dict[str, object] = {
        "nodes": c.nodes,
        "tasks_per_node": tasks,
        "signal_delay_s": s.signal_seconds,
    }
    options = resources(first.cluster, first.slurm, first.data, tasks)
    found["cpus_per_task"] = int(options.pop("cpus-per-task"))
    if c.device == "cuda":
        found["gpus_per_node"] = tasks
    for key in ("partition", "account"):
        if getattr(s, key):
            found[key] = getattr(s, key)
    sbatch: dict[str, str | int] = {**options, "time": s.time, "requeue": ""}
    sbatch |= {name: value for name, _, value in (o[2:].partition("=") for o in s.extra)}
    extra = "+hydra.launcher.additional_parameters"  # more sbatch options, written as given
    return [f"hydra.launcher.{k}={v}" for k, v in found.items()] + [
        f"{extra}.{k}={v!r}" if v else f"{extra}.{k}=true" for k, v in sbatch.items()
    ]

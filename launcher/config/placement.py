"""Where a job runs: the cluster it plans for and the Slurm settings of its sbatch script.
No torch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from launcher.config.checks import (
    require,
)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    name: str
    """cluster description name"""
    nodes: int | Literal["auto"] = "auto"
    """nodes; auto = the launched topology"""
    devices_per_node: int | Literal["auto"] = "auto"
    """processes (devices) per node; auto = the launched topology"""
    device_memory_gb: float | Literal["auto"] = "auto"
    """memory per device in GB; auto = measured on the device (later: memory planning)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device kind; auto = cuda when available, else cpu"""

    def __post_init__(self) -> None:
        for key in ("nodes", "devices_per_node", "device_memory_gb"):
            value = getattr(self, key)
            require(value == "auto" or value > 0, f"cluster.{key}", value, "must be > 0 or auto")

    @property
    def declared_world_size(self) -> int | None:
        if self.nodes == "auto" or self.devices_per_node == "auto":
            return None
        return self.nodes * self.devices_per_node


SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+(:\d{2}){0,2}$")
SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # partition and account names
SLURM_SIZE = re.compile(r"^\d+[KMGT]?$")  # sbatch memory sizes: 64G, 512000M, 0 (= all)
SLURM_OPTION = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=[^\s\x00-\x1f'\"`$\\;&|<>]+)?$")


def slurm_options(text: str) -> tuple[str, ...]:
    """`slurm.extra` written as one plain string, `--qos high --exclusive`: one option per `--`,
    a value after a space or an `=` (-> ("--qos=high", "--exclusive"))."""
    options: list[str] = []
    for word in text.split():
        if word.startswith("--") or not options or "=" in options[-1]:
            options.append(word)
        else:
            options[-1] += f"={word}"
    return tuple(options)


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    template: Literal["auto", "single_node", "multi_node", "multi_node_srun"] = "auto"
    """slurm/ template `python -m launcher.slurm` renders: auto = single_node for one node, else
    multi_node (torchrun per node); multi_node_srun = one srun task per device"""
    time: str | int = "24:00:00"
    """time limit (sbatch --time: MINUTES, HH:MM:SS or D-HH:MM:SS)"""
    partition: str | None = None
    """sbatch --partition; null = the cluster's default"""
    account: str | None = None
    """sbatch --account; null = the user's default"""
    signal_seconds: int = 120
    """ask Slurm for SIGUSR1 this long before the time limit: checkpoint at the next step, then
    `scontrol requeue`; 0 = no signal. Slurm may deliver it up to ~60 s late: cover that, a step
    and a save"""
    cpus_per_task: int | Literal["auto"] = "auto"
    """sbatch --cpus-per-task; auto = the training processes a task runs (torchrun's per node, or
    1 for an srun task per device) x (1 + data.workers, the loader workers of each)"""
    mem: str | None = "auto"
    """host memory per node (sbatch --mem: 64G, 512000M; 0 = all of it); auto = --mem-per-gpu=
    cluster.device_memory_gb on GPU nodes (as much RAM as each GPU holds: pinned batches and a
    CPU copy of the state for checkpoints), on CPU nodes devices_per_node x device_memory_gb,
    or 0 (the whole node) when that is auto; null = no flag (the cluster's default)"""
    mem_per_gpu: str | None = None
    """sbatch --mem-per-gpu (e.g. 120G), instead of mem"""
    exclusive: bool = False
    """sbatch --exclusive: the nodes are the job's alone"""
    extra: tuple[str, ...] | str = ()
    """further sbatch options: a plain string `--qos high --exclusive` (a value after a space;
    Hydra's grammar wants an `=` inside a value quoted) or a list ['--qos=high']"""

    def __post_init__(self) -> None:
        if isinstance(self.extra, str):
            object.__setattr__(self, "extra", slurm_options(self.extra))
        if isinstance(self.time, int):  # slurm.time=90: Hydra reads minutes as a number
            object.__setattr__(self, "time", str(self.time))
        require(
            bool(SLURM_TIME.match(str(self.time))),
            "slurm.time",
            self.time,
            "must be MINUTES, HH:MM:SS or D-HH:MM:SS",
        )
        require(
            self.signal_seconds >= 0, "slurm.signal_seconds", self.signal_seconds, "must be >= 0"
        )
        for key in ("partition", "account"):
            value = getattr(self, key)
            ok = value is None or bool(SLURM_NAME.match(value))
            require(ok, f"slurm.{key}", value, "must be a Slurm name (letters, digits, _.,:+-)")
        require(
            self.cpus_per_task == "auto" or self.cpus_per_task > 0,
            "slurm.cpus_per_task",
            self.cpus_per_task,
            "must be > 0 or auto",
        )
        for key in ("mem", "mem_per_gpu"):
            value = getattr(self, key)
            ok = (
                value is None or (key == "mem" and value == "auto") or bool(SLURM_SIZE.match(value))
            )
            require(bool(ok), f"slurm.{key}", value, "must be a size like 64G or 512000M")
        require(
            self.mem_per_gpu is None or self.mem in (None, "auto"),
            "slurm.mem_per_gpu",
            self.mem_per_gpu,
            f"give slurm.mem or slurm.mem_per_gpu, not both (slurm.mem={self.mem!r})",
        )
        for option in self.extra:
            require(
                bool(SLURM_OPTION.match(option)),
                "slurm.extra",
                option,
                "each must be one sbatch option, --name or --name=value (no spaces, quotes or "
                "shell characters)",
            )

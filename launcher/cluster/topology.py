"""Where this process sits: world size, ranks and device, from the launcher's environment.

torchrun and `accelerate launch` (and the launcher's own `trainer.devices=N`, which runs
torchrun's machinery) set WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE; the `deepspeed`
launcher sets LOCAL_SIZE instead of LOCAL_WORLD_SIZE. `srun` with one task per device sets only
SLURM_* variables: `slurm_env` turns them into torch's, with the rendezvous on the first node. A
plain `python -m launcher` is one process. `plan_only` can instead plan for a declared cluster.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from launcher.config.execution import TrainerConfig
from launcher.config.placement import ClusterConfig
from launcher.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    device: str  # "cpu" or "cuda"
    source: str = "a single process"  # who started the processes, for messages
    started: bool = False  # by a launcher (torchrun, accelerate, deepspeed, srun, trainer.devices)

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def shape(self) -> str:
        return (
            f"{self.nodes} node(s) x {self.local_world_size} process(es) per node = "
            f"{self.world_size}"
        )


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment {key}={raw!r}: must be an integer") from None


def _tasks_per_node(raw: str) -> set[int]:
    """Slurm's compressed task counts, e.g. '2(x3),1' -> {2, 1}."""
    counts = set()
    for item in raw.split(","):
        match = re.fullmatch(r"(\d+)(\(x\d+\))?", item.strip())
        if match is None:
            raise ConfigError(f"environment SLURM_STEP_TASKS_PER_NODE={raw!r}: not understood")
        counts.add(int(match.group(1)))
    return counts


def first_node_address(env: Mapping[str, str]) -> str:
    """The step's first node's NodeAddr (node names need not resolve), asked of scontrol."""
    import subprocess

    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")

    def scontrol(*args: str) -> str:
        return subprocess.run(
            ["scontrol", *args], capture_output=True, text=True, check=True, timeout=60
        ).stdout

    try:
        first = scontrol("show", "hostnames", nodes).split()[0]
        found = re.search(r"NodeAddr=(\S+)", scontrol("show", "node", first))
    except (OSError, IndexError, subprocess.SubprocessError):
        raise ConfigError(
            f"srun started several tasks but MASTER_ADDR is not set and scontrol cannot name the "
            f"first node of {nodes!r}: export MASTER_ADDR in the batch script"
        ) from None
    return found.group(1) if found else first


def slurm_env(
    env: Mapping[str, str], address: Callable[[Mapping[str, str]], str] = first_node_address
) -> dict[str, str]:
    """torch's variables for one task of a multi-task `srun` step; {} anywhere else (a single
    task, the batch shell, or workers of torchrun inside srun, which set WORLD_SIZE). The
    rendezvous is MASTER_ADDR:MASTER_PORT if exported, else the first node's address and
    20000 + job id mod 20000, as the slurm/ templates choose them."""
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    world = _env_int(env, "SLURM_STEP_NUM_TASKS", 1)
    if world == 1:
        return {}
    per_node = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(world)))
    if len(per_node) != 1:
        raise ConfigError(
            f"srun started {world} tasks unevenly over the nodes (SLURM_STEP_TASKS_PER_NODE="
            f"{env.get('SLURM_STEP_TASKS_PER_NODE')}): use --ntasks-per-node"
        )
    port = env.get("MASTER_PORT") or str(20000 + _env_int(env, "SLURM_JOB_ID", 0) % 20000)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(per_node.pop()),
        "MASTER_ADDR": env.get("MASTER_ADDR") or address(env),
        "MASTER_PORT": port,
    }


def _source(env: Mapping[str, str]) -> str:
    """Who started this process, for messages (torch's variables already filled in)."""
    job = f" in Slurm job {env['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in env else ""
    if "WORLD_SIZE" not in env:
        return f"a single process{job}"
    if "LAUNCHER_SPAWNED" in env:
        return "trainer.devices"
    if "TORCHELASTIC_RUN_ID" in env:
        return f"torchrun / accelerate launch{job}"
    if "LOCAL_SIZE" in env:
        return f"the deepspeed launcher{job}"
    if env.get("SLURM_STEP_NUM_TASKS") == env["WORLD_SIZE"]:
        return f"srun{job}"
    return f"WORLD_SIZE={env['WORLD_SIZE']}{job}"


def from_env(env: Mapping[str, str] | None = None, cuda: bool | None = None) -> Topology:
    """The launched topology (one process when no launcher variables are set)."""
    env = os.environ if env is None else env
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    env = {**env, **slurm_env(env)}
    source = _source(env)
    world = _env_int(env, "WORLD_SIZE", 1)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", _env_int(env, "LOCAL_SIZE", world))
    if local_world < 1 or world % local_world:
        raise ConfigError(
            f"environment: WORLD_SIZE={world} is not a multiple of the {local_world} process(es) "
            "per node; start the same number of processes on every node"
        )
    return Topology(
        world_size=world,
        rank=_env_int(env, "RANK", 0),
        local_rank=_env_int(env, "LOCAL_RANK", 0),
        local_world_size=local_world,
        device="cuda" if cuda else "cpu",
        source=source,
        started="WORLD_SIZE" in env,
    )


def local_processes(
    trainer: TrainerConfig, c: ClusterConfig, launched: Topology, visible_gpus: int
) -> int:
    """How many workers a plain `python -m launcher` starts on this machine (trainer.devices);
    0 when it trains in this process (one device, or a launcher already started us). Under
    plan_only nothing starts, but the plan is for this many processes."""
    devices = trainer.devices
    if launched.started:
        if devices != "auto" and devices != launched.local_world_size:
            raise ConfigError(
                f"trainer.devices={devices}: {launched.source} started "
                f"{launched.local_world_size} process(es) on this node; make them agree (or drop "
                "trainer.devices)"
            )
        return 0
    cuda = c.device == "cuda" or (c.device == "auto" and launched.device == "cuda")
    if devices == "auto":
        if c.nodes not in ("auto", 1):
            return 0  # several nodes: torchrun or srun starts them (resolve() says so)
        declared = c.devices_per_node
        devices = declared if declared != "auto" else (visible_gpus if cuda else 1)
        if cuda and devices > visible_gpus:
            return 0  # resolve() explains that this machine is not the declared cluster
    if cuda and devices > visible_gpus:
        raise ConfigError(
            f"trainer.devices={devices}: this machine has {visible_gpus} visible CUDA device(s)"
        )
    return devices if devices > 1 else 0


def resolve(cluster: ClusterConfig, launched: Topology, plan_only: bool) -> Topology:
    """The topology to plan for: the declared cluster under plan_only, else the launched one."""
    declared = cluster.declared_world_size
    device = launched.device if cluster.device == "auto" else cluster.device
    if declared is None:
        if cluster.device == "cuda" and launched.device != "cuda" and not plan_only:
            raise ConfigError("cluster.device='cuda': no CUDA device is visible to this process")
        return Topology(
            launched.world_size,
            launched.rank,
            launched.local_rank,
            launched.local_world_size,
            device,
            launched.source,
            launched.started,
        )
    if plan_only:
        return Topology(declared, 0, 0, int(cluster.devices_per_node), device, "plan_only")
    if (cluster.nodes, cluster.devices_per_node) != (launched.nodes, launched.local_world_size):
        raise ConfigError(
            f"cluster={cluster.name!r}: expects {cluster.nodes} node(s) x "
            f"{cluster.devices_per_node} device(s) per node = {declared}, but {launched.source} "
            f"started {launched.shape} process(es); add plan_only=true to plan for it, or launch "
            "with that shape (python -m launcher.slurm renders a matching sbatch script)"
        )
    if device == "cuda" and launched.device != "cuda":
        raise ConfigError(f"cluster={cluster.name!r}: needs CUDA, which this process cannot see")
    return launched

"""Where this process sits: world size, ranks and device, from the launcher's environment.

torchrun and `accelerate launch` set WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE (the
`deepspeed` launcher: LOCAL_SIZE); a plain
`python -m launcher` is one process. `plan_only` can instead plan for a declared cluster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from launcher.config import ClusterConfig, ConfigError


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    device: str  # "cpu" or "cuda"

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment {key}={raw!r}: must be an integer") from None


def from_env(env: Mapping[str, str] | None = None, cuda: bool | None = None) -> Topology:
    """The launched topology (one process when no launcher variables are set)."""
    env = os.environ if env is None else env
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    world = _env_int(env, "WORLD_SIZE", 1)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", _env_int(env, "LOCAL_SIZE", world))
    return Topology(
        world_size=world,
        rank=_env_int(env, "RANK", 0),
        local_rank=_env_int(env, "LOCAL_RANK", 0),
        local_world_size=local_world,
        device="cuda" if cuda else "cpu",
    )


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
        )
    if plan_only:
        return Topology(declared, 0, 0, int(cluster.devices_per_node), device)
    if declared != launched.world_size:
        raise ConfigError(
            f"cluster={cluster.name!r}: declares {cluster.nodes} x {cluster.devices_per_node} = "
            f"{declared} devices but this launch has {launched.world_size} process(es); "
            "add plan_only=true to plan for it, or launch with that many processes"
        )
    if device == "cuda" and launched.device != "cuda":
        raise ConfigError(f"cluster={cluster.name!r}: needs CUDA, which this process cannot see")
    return launched

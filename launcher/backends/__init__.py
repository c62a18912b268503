"""Backends by name: each name's class, imported when it is built (each loads torch), and
checked by mypy against the protocol the loop and the job call (launcher/types/backend.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from launcher.backends.ds_config import ds_config, write_ds_config
from launcher.config.capabilities import capabilities
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError
from launcher.types.backend import Backend
from launcher.types.plan import BatchPlan

# A backend class: built from the run's config and the device ("cpu", "cuda")
Factory = Callable[[RunConfig, str], Backend]


def _accelerate() -> Factory:
    from launcher.backends.accelerate import AccelerateBackend  # heavy: torch

    return AccelerateBackend


def _deepspeed() -> Factory:
    from launcher.backends.deepspeed import DeepSpeedBackend  # heavy: torch

    return DeepSpeedBackend


def _fsdp() -> Factory:
    from launcher.backends.fsdp import FsdpBackend  # heavy: torch

    return FsdpBackend


BACKENDS: dict[str, Callable[[], Factory]] = {
    "accelerate": _accelerate,
    "deepspeed": _deepspeed,
    "fsdp": _fsdp,
}


def check(cfg: RunConfig, plan: BatchPlan, device: str) -> None:
    """Raise ConfigError where the backend cannot run `plan` (before any process starts work)."""
    if cfg.backend.name == "deepspeed":
        ds_config(cfg, plan, device)
    fsdp = cfg.backend.name == "fsdp"
    # FsdpConfig offers no fp16, but `auto` becomes fp16 on a GPU without bf16 (job.on_device)
    if fsdp and cfg.backend.mixed_precision == "fp16":
        raise ConfigError(
            "backend.mixed_precision='fp16' (auto on a GPU without bf16): backend=fsdp offers bf16 "
            "or no (fp16 loss scaling would need a sharded gradient scaler); set "
            "backend.mixed_precision=no"
        )
    unable = capabilities(cfg.backend).ramp_up
    if plan.ramp and unable is not None:
        raise ConfigError(f"ramp.start_batch={cfg.ramp.start_batch}: {unable}")


def write_config(run_dir: Any, cfg: RunConfig, plan: BatchPlan, device: str) -> None:
    """The backend's own config file beside plan.json, where it has one (ds_config.json)."""
    if capabilities(cfg.backend).config_file:
        write_ds_config(run_dir, ds_config(cfg, plan, device))


def teardown() -> None:
    """Once per process, after the last job: barrier, then destroy the process group.

    gloo aborts 10-20% of exits without both (shared/notes/environment-facts.md). The group lives
    across the jobs of a sweep, so this is not per job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_backend(cfg: RunConfig, device: str) -> Backend:
    return BACKENDS[cfg.backend.name]()(cfg, device)

"""Backends by name."""

from __future__ import annotations

import importlib
from typing import Any

from launcher.config.capabilities import capabilities
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError
from launcher.types.plan import BatchPlan

BACKENDS = {
    "accelerate": "launcher.backends.accelerate:AccelerateBackend",
    "deepspeed": "launcher.backends.deepspeed:DeepSpeedBackend",
    "fsdp": "launcher.backends.fsdp:FsdpBackend",
}


def check(cfg: RunConfig, plan: BatchPlan, device: str) -> None:
    """Raise ConfigError where the backend cannot run `plan` (before any process starts work)."""
    if cfg.backend.name == "deepspeed":
        from launcher.backends.ds_config import ds_config

        ds_config(cfg, plan, device)
    if cfg.backend.name == "fsdp" and cfg.backend.mixed_precision == "fp16":
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
        from launcher.backends.ds_config import ds_config, write_ds_config

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


def build_backend(cfg: RunConfig, device: str) -> Any:
    module, _, cls = BACKENDS[cfg.backend.name].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg, device)

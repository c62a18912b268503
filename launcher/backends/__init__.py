"""Backends by name."""

from __future__ import annotations

import importlib
from typing import Any

from launcher.config import ConfigError, RunConfig
from launcher.plan import BatchPlan

BACKENDS = {
    "accelerate": "launcher.backends.accelerate:AccelerateBackend",
    "deepspeed": "launcher.backends.deepspeed:DeepSpeedBackend",
}


def check(cfg: RunConfig, plan: BatchPlan, device: str) -> None:
    """Raise ConfigError where the backend cannot run `plan` (before any process starts work)."""
    if cfg.backend.name == "deepspeed":
        from launcher.backends.ds_config import ds_config

        ds_config(cfg, plan, device)
        if plan.ramp:
            raise ConfigError(
                f"ramp.start_batch={cfg.ramp.start_batch}: a batch ramp-up runs with "
                "backend=accelerate only so far (the DeepSpeed engine's batch bookkeeping is not "
                "re-planned mid-run yet)"
            )


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

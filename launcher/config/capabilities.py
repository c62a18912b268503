"""What each backend supports, declared beside the backends' configs (execution.py) so that the
planner, a layer below launcher/backends/, reads it too; no backend name is compared outside this
module and launcher/backends/. PURE: no torch, no DeepSpeed.

Each field is None where the backend supports the thing, else the reason it does not (the plan
and its refusals quote it), so a new backend is one function in CAPABILITIES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from launcher.config.execution import (
    AccelerateConfig,
    BackendConfig,
    DeepSpeedConfig,
    FsdpConfig,
)


@dataclass(frozen=True)
class Sharding:
    """How a backend that shards the model over the ranks (FSDP2) holds it on each: what the
    memory probe credits (launcher/memory/sharding.py). Itemsizes are None where the tensors
    keep the parameters' own dtype."""

    gather_itemsize: int | None  # gathered (unsharded) parameters: bf16 mixed precision 2
    grad_itemsize: int | None  # gradients accumulated over micro-steps: the reduce dtype's
    reshard_after_forward: bool  # blocks gathered one at a time (else forward to backward)
    oom_safe_whole: bool  # the OOM-safe step gathers every parameter and holds whole gradients


@dataclass(frozen=True)
class Capabilities:
    oom_recovery: str | None  # why an out-of-memory step cannot be dropped on every rank
    checkpoints: str | None  # why a run cannot be resumed from its checkpoints
    gradients: str | None  # why the loop cannot see each rank's gradients (noise scale, ramps)
    ramp_up: str | None  # why a fixed batch ramp-up cannot run
    zero_buckets: bool  # its memory beyond a plain step: ZeRO's gradient buckets, not DDP's
    config_file: bool  # it writes its own config beside plan.json (ds_config.json)
    sharding: Sharding | None = None  # parameters, gradients, optimizer state sharded: how
    sharded_checkpoints: bool = False  # every rank writes its shards (torch.distributed.checkpoint)


def _accelerate(b: AccelerateConfig) -> Capabilities:
    return Capabilities(None, None, None, None, zero_buckets=False, config_file=False)


def _deepspeed(b: DeepSpeedConfig) -> Capabilities:
    oom = None
    if b.zero_stage >= 2:
        oom = (
            f"ZeRO stage {b.zero_stage} reduces gradients inside backward, so a rank that runs out "
            "of memory would leave the others waiting in a collective"
        )
    half = b.mixed_precision if not b.autocast else "no"
    checkpoints = None
    if b.fused_optimizer or half == "fp16" or (half == "bf16" and not b.zero_stage):
        checkpoints = (
            "resuming backend=deepspeed needs ZeRO 0 with float32 parameters (mixed_precision=no "
            "or autocast=true), or ZeRO 1-3 (also in bf16 mode), and the launcher's optimizer so "
            "far; model_final.pt is still written"
        )
    return Capabilities(
        oom_recovery=oom,
        checkpoints=checkpoints,
        gradients="backend=deepspeed: its engine reduces the gradients inside step(), where the "
        "loop cannot see them",
        ramp_up="a batch ramp-up runs with backend=accelerate only so far (the DeepSpeed engine's "
        "batch bookkeeping is not re-planned mid-run yet)",
        zero_buckets=b.zero_stage in (1, 2),
        config_file=True,
    )


def _fsdp(b: FsdpConfig) -> Capabilities:
    return Capabilities(
        oom_recovery=None,  # deferred reduction: launcher/backends/fsdp.py
        checkpoints=None,
        gradients="backend=fsdp: gradients are reduce-scattered, each rank holds only its shard",
        ramp_up=None,
        zero_buckets=False,
        config_file=False,
        sharded_checkpoints=True,
        sharding=_fsdp_sharding(b),
    )


def _fsdp_sharding(b: FsdpConfig) -> Sharding:
    """launcher/backends/fsdp.py's policy: bf16 gathers in bf16 and accumulates gradients in
    float32 (reduce_dtype=float32) or bf16 (param); mixed_precision=no (auto before it is
    resolved counts as no: the larger) keeps the parameters' dtype throughout."""
    half = b.mixed_precision == "bf16"
    return Sharding(
        gather_itemsize=2 if half else None,
        grad_itemsize=(4 if b.reduce_dtype == "float32" else 2) if half else None,
        reshard_after_forward=b.reshard_after_forward,
        oom_safe_whole=True,  # the deferred reduction (module docstring there)
    )


CAPABILITIES: dict[str, Callable[[Any], Capabilities]] = {
    "accelerate": _accelerate,
    "deepspeed": _deepspeed,
    "fsdp": _fsdp,
}


def capabilities(backend: BackendConfig) -> Capabilities:
    """The capabilities of a backend config (cfg.backend)."""
    return CAPABILITIES[backend.name](backend)

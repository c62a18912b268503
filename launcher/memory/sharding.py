"""What a sharding backend (FSDP2) saves on each rank against the memory probe's step.

The probe runs one step of the whole model in one process; a rank of a sharded run holds less.
`sharding_credit` (pure) is the difference, from byte counts taken on the meta device
(`model_bytes`), and is subtracted from every line of the profile: it is built from what the
two hold at every op of a step, so a constant holds wherever the peak falls (measured per rank
on 2 gloo ranks: bench/README.md, "The memory probe under backend=fsdp (issue 22)").

The probe's step for a sharding backend is a micro-step after the first of an accumulation:
the gradients of the earlier micro-steps are held throughout (probe.py), as FSDP2 holds them
whole on every rank until they are reduced (deferred, or its own no-sync accumulation). With
both holding gradients, at every op of the step a rank holds, against the probe:

- optimizer state: 1/world (sharded like the parameters; float32), so O (1 - 1/world) less;
- parameters: its float32 shard (1/world, dim 0 padded to the world size) plus the gathered
  (unsharded) parameters of what is being computed, in the gathered dtype (bf16 under
  mixed_precision=bf16). The OOM-safe step (plan.oom_recovery) gathers every parameter before
  its micro-steps, as does reshard_after_forward=false from forward to backward (whole); else
  the root (which FSDP2 keeps gathered), the block being computed and the one prefetched for
  backward, and one more for the gather's copy-out;
- accumulated gradients: whole, in the reduce dtype (float32, or bf16 with reduce_dtype=param);
- at the reduction, a block's gradients in the reduce dtype (the reduce-scatter's input)
  where its gathered parameters, freed just before, were smaller (bf16 gathers, float32
  reductions).

Not credited, so the estimate errs towards less room there: a step of one micro-batch
(accumulation 1) holds no earlier gradients; under oom_recovery=false FSDP2 also shards the
gradients once reduced, and the bound on gathered blocks holds at every op, not only at the
peak; under bf16 the probe's autocast keeps some activations in float32 and casts copies of the
weights, where a bf16 FSDP2 forward computes in bf16 throughout (measured: 15-20% over).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.config.capabilities import Sharding
from launcher.config.components import ModelConfig
from launcher.config.optimization import OptimConfig
from launcher.data import DataSpec
from launcher.models import blocks_of, build_model
from launcher.types.plan import BatchPlan

GATHERED_BLOCKS = 3  # computed, prefetched for backward, and the one being copied out


@dataclass(frozen=True)
class ModelBytes:
    """Byte counts of one model and its optimizer, as the probe's step holds them."""

    params: int  # every parameter, in the run's dtype (trainer.dtype)
    shard: int  # the largest rank's parameter shard (dim 0 padded to the world size)
    state: int  # optimizer state
    root: int  # parameters of the root unit: those in no block
    blocks: tuple[int, ...]  # parameters of each block (a unit each), in module order
    itemsize: int  # bytes per parameter element (4: float32, 8: float64)


@dataclass(frozen=True)
class Credit:
    bytes: int  # subtracted from every line of the profile (negative: the rank holds more)
    text: str  # the plan's memory row: what is sharded, and how much that saves


def sharding_credit(m: ModelBytes, world: int, sharding: Sharding, oom_safe: bool) -> Credit:
    """The bytes one rank holds less than the probe's step (`sharding`: the backend's
    Capabilities.sharding; `oom_safe`: the plan's deferred reduction)."""

    def cast(nbytes: int, itemsize: int | None) -> int:
        return nbytes * itemsize // m.itemsize if itemsize else nbytes

    state_shard = -(-m.state * m.shard // m.params) if m.params else 0
    whole = (oom_safe and sharding.oom_safe_whole) or not sharding.reshard_after_forward
    largest = sorted(m.blocks, reverse=True)
    gathered_raw = m.params if whole else m.root + sum(largest[:GATHERED_BLOCKS])
    gathered = cast(gathered_raw, sharding.gather_itemsize)
    held = cast(m.params, sharding.grad_itemsize)
    unit = max([m.root, *m.blocks])
    reduce_input = max(cast(unit, sharding.grad_itemsize) - cast(unit, sharding.gather_itemsize), 0)
    saved = (m.state - state_shard) + (m.params - m.shard - gathered) + (m.params - held)
    saved -= reduce_input
    if not whole:
        how = f"the root and {GATHERED_BLOCKS} largest blocks gathered at a time"
    elif oom_safe and sharding.oom_safe_whole:
        how = "all gathered for the OOM-safe step"
    else:
        how = "all gathered from forward to backward"
    ranks = f"{world} rank{'s' if world > 1 else ''}"
    text = (
        f"sharded over {ranks}: optimizer state 1/{world}; parameters 1/{world} + {how} "
        f"({_human(gathered)}{' in bf16' if sharding.gather_itemsize == 2 else ''}); gradients "
        f"whole between micro-steps ({_human(held)}): {_human(abs(saved))} "
        f"{'less' if saved >= 0 else 'more'} per rank"
    )
    return Credit(saved, text)


def _human(n: int) -> str:
    """As launcher.memory.profile.human_bytes (which this pure module does not import)."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:,.0f} B" if unit == "B" else f"{value:,.1f} {unit}"


def model_bytes(
    model_cfg: ModelConfig, dtype_name: str, spec: DataSpec, plan: BatchPlan, optim: OptimConfig
) -> ModelBytes:
    """The counts for `sharding_credit`, on the meta device (nothing allocated): the model,
    its FSDP units (launcher/backends/fsdp.py's wrap policy) and its optimizer's state after a
    step on zero gradients."""
    import torch

    from launcher.backends.fsdp import shard_units  # heavy: torch
    from launcher.optim import build_optimizer  # heavy: torch

    dtype = getattr(torch, dtype_name)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build_model(model_cfg, spec, fresh=True)
    finally:
        torch.set_default_dtype(default)
    units = shard_units(model, blocks_of(model_cfg, model))
    world = plan.world_size

    def nbytes(tensors: Any) -> int:
        return sum(int(t.numel()) * t.element_size() for t in tensors)

    def shard(p: torch.Tensor) -> int:  # FSDP2's: dim 0 in world-size chunks, padded
        rows = p.shape[0] if p.dim() else 1
        return -(-rows // world) * (p.numel() // max(rows, 1)) * p.element_size()

    blocks = tuple(nbytes(u.parameters()) for u in units)
    params = list(model.parameters())
    opt = build_optimizer(plan.optimizer, optim, model, plan.lr, plan.weight_decay)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return ModelBytes(
        params=nbytes(params),
        shard=sum(shard(p) for p in params),
        state=nbytes(state),
        root=nbytes(params) - sum(blocks),
        blocks=blocks,
        itemsize=dtype.itemsize,
    )

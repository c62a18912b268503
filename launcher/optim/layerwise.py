"""What LARS and LAMB share: closure handling, the parameters to update, the guarded trust ratio,
and the full norms of sharded (DTensor) parameters.

Under FSDP2 (`fully_shard`) each parameter, its gradient and the optimizer state are DTensors
sharded on dim 0 over a device mesh; a rank holds a slice of each (possibly an uneven one, or an
empty one where dim 0 is shorter than the mesh). The elementwise update runs on those local
slices (`local`, `local_param_and_grad`), and the layer-wise norms are assembled by
`full_norms`: each rank squares and sums its slices, the sums of a whole param group go into one
tensor, and one all-reduce (SUM) over the sharded mesh dimension gives every rank the full
squared norms, whose square roots are the norms of the whole tensors. Plain tensors take none of
this: their norms are `torch.linalg.vector_norm` of the tensor, as before.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def closure_loss(closure: Callable[[], float] | None) -> float | None:
    """Re-evaluate the model with gradients on, as torch optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def params_with_grads(group: dict[str, Any], name: str) -> Iterator[tuple[Tensor, Tensor]]:
    """(param, grad) for each parameter of `group` that has a dense gradient."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        yield p, p.grad


def trust_ratio(ratio: Tensor, w_norm: Tensor, other_norm: Tensor) -> Tensor:
    """`ratio` where both norms are positive, else 1 (no adaptation); never syncs with the GPU.
    Under sharding the norms are those of the whole tensors (`full_norms`), so every rank takes
    the same branch, including a rank whose slice is empty."""
    return torch.where((w_norm > 0) & (other_norm > 0), ratio, 1.0)


def is_sharded(t: Tensor) -> bool:
    """Whether `t` is a DTensor. A DTensor cannot exist before its module is imported, so this
    does not import it (0.3 s) for runs that never shard."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's slice of a DTensor (the DTensor's own storage: in-place ops update it), or a
    plain tensor itself."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def like(param: Tensor, local_tensor: Tensor) -> Tensor:
    """`local_tensor`, this rank's slice, as optimizer state for `param`: for a DTensor param a
    DTensor with its mesh, placements, shape and stride (what torch's own optimizers keep under
    FSDP2, and what torch.distributed.checkpoint's state dicts expect), else itself."""
    if not is_sharded(param):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_tensor,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def local_param_and_grad(p: Tensor, g: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """The slices of `p` and its gradient `g` on this rank (themselves for plain tensors); the
    gradient of a DTensor parameter must be sharded as the parameter is (FSDP2's are)."""
    if not is_sharded(p):
        return p, g
    same = (
        is_sharded(g)
        and g.device_mesh == p.device_mesh  # type: ignore[attr-defined]
        and g.placements == p.placements  # type: ignore[attr-defined]
    )
    if not same:
        layout = getattr(g, "placements", "a plain tensor")
        raise ValueError(
            f"{name}: the gradient of a DTensor parameter must be a DTensor on the same mesh with "
            f"the same placements ({p.placements}); got {layout}"  # type: ignore[attr-defined]
        )
    return p.to_local(), g.to_local()  # type: ignore[attr-defined]


def full_norms(slices: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """The 2-norm of each whole tensor, given (this rank's slice, the DTensor whose layout the
    slice has) for each: the slices' sums of squares, stacked into one tensor per layout (one for
    all the tensors of an FSDP2 model), all-reduced (SUM) once over each mesh dimension the layout
    shards (the only one, for FSDP2's 1-D mesh), then square-rooted. Accumulated in float32 at
    least. Returns 0-dim tensors on the slices' device; nothing waits on the host, and every rank
    must call it with the same layouts in the same order (one collective per layout)."""
    if not slices:
        return []
    acc = functools.reduce(torch.promote_types, (s.dtype for s, _ in slices), torch.float32)
    layouts: dict[tuple[Any, tuple[Any, ...]], list[int]] = {}
    for i, (_, dt) in enumerate(slices):
        key = (dt.device_mesh, tuple(dt.placements))  # type: ignore[attr-defined]
        layouts.setdefault(key, []).append(i)
    norms: dict[int, Tensor] = {}
    for (mesh, placements), idx in layouts.items():
        sq = torch.stack([torch.linalg.vector_norm(slices[i][0], dtype=acc) for i in idx]).square_()
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
            elif placement.is_partial():
                raise ValueError(f"a parameter with a Partial placement ({placements}) has no norm")
        norms.update(zip(idx, sq.sqrt_().unbind(), strict=True))
    return [norms[i] for i in range(len(slices))]

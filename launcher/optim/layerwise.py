"""What LARS and LAMB share: closure handling, the parameters to update, the guarded trust ratio."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
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
    """`ratio` where both norms are positive, else 1 (no adaptation); never syncs with the GPU."""
    return torch.where((w_norm > 0) & (other_norm > 0), ratio, 1.0)

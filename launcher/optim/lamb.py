"""LAMB: layer-wise adaptive moments for large-batch training (You et al. 2019).

FSDP2-sharded (DTensor) parameters are updated on this rank's slices; the trust ratio takes the
norms of the whole tensors: once a group's updates are computed, the squared norms of its weight
and update slices go into one tensor, all-reduced once per step and group
(launcher.optim.layerwise.full_norms). The moment estimates are DTensors sharded as their
parameter; ``step`` is a per-parameter int.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from launcher.optim.layerwise import (
    closure_loss,
    full_norms,
    is_sharded,
    local,
    local_param_and_grad,
    params_with_grads,
    trust_ratio,
)


class LAMB(torch.optim.Optimizer):
    """Adam-style update with decoupled weight decay scaled by a per-parameter trust ratio.

    The trust ratio of a tensor is ``||w|| / ||u||`` for its update ``u`` (1 where either norm is
    0). For a DTensor (FSDP2) parameter the norms are those of the whole tensor across all shards,
    computed with one all-reduce per param group and step, after the group's updates (which are
    held until then: one slice-sized tensor per parameter); a plain tensor's are
    ``torch.linalg.vector_norm`` of the tensor, and its update is applied at once.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ) -> None:
        """Validate hyperparameters and set per-group defaults (``adapt`` defaults to True)."""
        if lr < 0.0:
            raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid betas[0]: {betas[0]} (must be in [0, 1))")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas[1]: {betas[1]} (must be in [0, 1))")
        if eps < 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be >= 0)")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            held: list[tuple[Tensor, Tensor, Tensor]] = []  # (param, its slice, the update's)
            for p, g in params_with_grads(group, "LAMB"):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                w, g = local_param_and_grad(p, g, "LAMB")
                m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                u = (m / (1 - b1**t)).div_(denom)
                if wd != 0:
                    u.add_(w, alpha=wd)
                if group["adapt"]:
                    if is_sharded(p):
                        held.append((p, w, u))
                        continue
                    w_norm = torch.linalg.vector_norm(w)
                    u_norm = torch.linalg.vector_norm(u)
                    u.mul_(trust_ratio(w_norm / u_norm, w_norm, u_norm))
                w.add_(u, alpha=-lr)
            if held:
                found = full_norms([(w, p) for p, w, _ in held] + [(u, p) for p, _, u in held])
                for j, (_, w, u) in enumerate(held):
                    w_norm, u_norm = found[j], found[len(held) + j]
                    u.mul_(trust_ratio(w_norm / u_norm, w_norm, u_norm))
                    w.add_(u, alpha=-lr)
        return loss

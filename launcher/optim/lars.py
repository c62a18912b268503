"""LARS: layer-wise adaptive rate scaling (You et al. 2017), as used in MLPerf and timm.

FSDP2-sharded (DTensor) parameters are updated on this rank's slices; the trust ratio takes the
norms of the whole tensors: the squared norms of a group's weight and gradient slices go into one
tensor, all-reduced once per step and group (launcher.optim.layerwise.full_norms). The momentum
buffer is a DTensor sharded as its parameter.
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
    like,
    local,
    local_param_and_grad,
    params_with_grads,
    trust_ratio,
)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-parameter trust ratio; groups with ``adapt=False`` skip it.

    The trust ratio of a tensor is ``trust_coefficient * ||w|| / (||g|| + wd * ||w|| + eps)``
    (1 where either norm is 0). For a DTensor (FSDP2) parameter the norms are those of the whole
    tensor across all shards, computed with one all-reduce per param group and step; a plain
    tensor's are ``torch.linalg.vector_norm`` of the tensor.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        nesterov: bool = False,
        eps: float = 0.0,
    ) -> None:
        """Validate hyperparameters and set per-group defaults (``adapt`` defaults to True)."""
        if lr < 0.0:
            raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be >= 0)")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        if trust_coefficient <= 0.0:
            raise ValueError(f"Invalid trust_coefficient: {trust_coefficient} (must be > 0)")
        if eps < 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be >= 0)")
        if nesterov and momentum <= 0.0:
            raise ValueError(f"Invalid momentum: {momentum} (nesterov requires momentum > 0)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "nesterov": nesterov,
            "eps": eps,
            "adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            pairs = list(params_with_grads(group, "LARS"))
            norms: list[tuple[Tensor, Tensor] | None] = [None] * len(pairs)
            sharded = [i for i, (p, _) in enumerate(pairs) if is_sharded(p)]
            if group["adapt"] and sharded:
                tensors = [pairs[i][0] for i in sharded] + [pairs[i][1] for i in sharded]
                found = full_norms([(local(t), t) for t in tensors])  # weights', then gradients'
                for j, i in enumerate(sharded):
                    norms[i] = (found[j], found[len(sharded) + j])
            for (p, g), pg_norms in zip(pairs, norms, strict=True):
                self._update(group, p, g, pg_norms)
        return loss

    def _update(
        self, group: dict[str, Any], p: Tensor, g: Tensor, norms: tuple[Tensor, Tensor] | None
    ) -> None:
        """Update `p` (this rank's slice of it, for a DTensor) from its gradient `g`; `norms` are
        the full (||w||, ||g||) of a sharded parameter, None to take a plain tensor's own."""
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        w, g = local_param_and_grad(p, g, "LARS")
        d = g.add(w, alpha=wd) if wd != 0 else g.clone()
        if group["adapt"]:
            if norms is None:
                norms = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
            w_norm, g_norm = norms
            ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            d.mul_(trust_ratio(ratio, w_norm, g_norm))
        if mom != 0:
            state = self.state[p]
            if "momentum_buffer" not in state:
                buf = d.clone()
                state["momentum_buffer"] = like(p, buf)
            else:
                buf = local(state["momentum_buffer"]).mul_(mom).add_(d)
            d = d.add(buf, alpha=mom) if group["nesterov"] else buf
        w.add_(d, alpha=-lr)

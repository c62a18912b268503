"""LARS: layer-wise adaptive rate scaling (You et al. 2017), as used in MLPerf and timm."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from launcher.optim.layerwise import closure_loss, params_with_grads, trust_ratio


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-parameter trust ratio; groups with ``adapt=False`` skip it."""

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
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p, g in params_with_grads(group, "LARS"):
                d = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ratio = (
                        group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    )
                    d.mul_(trust_ratio(ratio, w_norm, g_norm))
                if mom != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf = state["momentum_buffer"].mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss

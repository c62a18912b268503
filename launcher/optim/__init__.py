"""Optimizers by name, with norm and bias parameters excluded from weight decay and adaptation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from launcher.config.optimization import OptimConfig
from launcher.optim.lamb import LAMB
from launcher.optim.lars import LARS


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights (decay, adapt) and 1-D params: biases, BN/LN scales (neither)."""
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "adapt": True}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "adapt": False})
    return groups


def _without_adapt(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """torch's own optimizers reject unknown group keys."""
    return [{k: v for k, v in g.items() if k != "adapt"} for g in groups]


def _sgd(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = _without_adapt(groups)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _adam(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(_without_adapt(groups), lr=lr, betas=cfg.betas, eps=cfg.eps)


def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_without_adapt(groups), lr=lr, betas=cfg.betas, eps=cfg.eps)


def _lars(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return LARS(
        groups,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        trust_coefficient=cfg.trust_coefficient,
    )


def _lamb(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return LAMB(groups, lr=lr, betas=cfg.betas, eps=cfg.lamb_eps)


Factory = Callable[[list[dict[str, Any]], OptimConfig, float], torch.optim.Optimizer]
# by name: the optimizer table's keys (launcher/config/optimizers.py; tests/test_optimizers.py)
OPTIMIZERS: dict[str, Factory] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "lars": _lars,
    "lamb": _lamb,
}


def build_optimizer(
    name: str, cfg: OptimConfig, model: nn.Module, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The plan's optimizer over `model`: its name, LR and weight decay, the rest from `cfg`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name](param_groups(model, weight_decay), cfg, lr)

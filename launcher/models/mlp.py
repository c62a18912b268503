"""A plain MLP over the flattened input (MNIST-1D paper baseline)."""

from __future__ import annotations

import math

from torch import nn

from launcher.config.components import MLPConfig
from launcher.data import DataSpec
from launcher.models.checkpointing import Block

BLOCKS = (Block,)


def build(cfg: MLPConfig, spec: DataSpec) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(spec.input_shape)
    for _ in range(cfg.depth):
        layers.append(Block(nn.Linear(width, cfg.hidden), nn.ReLU()))
        width = cfg.hidden
    assert spec.num_classes is not None  # build_model refuses data that declares none
    layers.append(nn.Linear(width, spec.num_classes))
    return nn.Sequential(*layers)

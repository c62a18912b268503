"""The MNIST-1D paper's 1-D CNN (ConvBase): three strided convolutions and a linear head."""

from __future__ import annotations

from torch import nn

from launcher.config.components import CNN1DConfig
from launcher.data import DataSpec
from launcher.errors import ConfigError
from launcher.models.checkpointing import Block

BLOCKS = (Block,)


def _out_len(length: int, kernel: int, stride: int, pad: int) -> int:
    return (length + 2 * pad - kernel) // stride + 1


def build(cfg: CNN1DConfig, spec: DataSpec) -> nn.Module:
    if len(spec.input_shape) != 2:
        raise ConfigError(
            f"model.name='cnn1d': needs (channels, length) inputs, not {spec.input_shape}"
        )
    in_ch, length = spec.input_shape
    c = cfg.channels
    assert spec.num_classes is not None  # build_model refuses data that declares none
    for kernel in (5, 3, 3):
        length = _out_len(length, kernel, 2, 1)
    return nn.Sequential(
        Block(nn.Conv1d(in_ch, c, 5, stride=2, padding=1), nn.ReLU()),
        Block(nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU()),
        Block(nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(c * length, spec.num_classes),
    )

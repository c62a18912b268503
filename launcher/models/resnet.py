"""torchvision ResNets, with the last BN gamma of each residual block zero-initialised."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from launcher.config import ConfigError, ResNetConfig
from launcher.data import DataSpec

BLOCKS = (BasicBlock, Bottleneck)


def build(cfg: ResNetConfig, spec: DataSpec) -> nn.Module:
    import torchvision

    if len(spec.input_shape) != 3:
        raise ConfigError(
            f"model.arch={cfg.arch!r}: needs (3, H, W) images, the data gives {spec.input_shape}"
        )
    factory = getattr(torchvision.models, cfg.arch)
    return factory(
        weights=None, num_classes=spec.num_classes, zero_init_residual=cfg.zero_init_residual
    )

"""torchvision ResNets, with the last BN gamma of each residual block zero-initialised, and the
small-image stem for CIFAR (a 3x3 stride-1 first convolution, no max-pool)."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from launcher.config.components import ResNetConfig
from launcher.data import DataSpec
from launcher.errors import ConfigError

BLOCKS = (BasicBlock, Bottleneck)


def build(cfg: ResNetConfig, spec: DataSpec) -> nn.Module:
    import torchvision

    if len(spec.input_shape) != 3:
        raise ConfigError(
            f"model.arch={cfg.arch!r}: needs (3, H, W) images, the data gives {spec.input_shape}"
        )
    factory = getattr(torchvision.models, cfg.arch)
    model = factory(
        weights=None, num_classes=spec.num_classes, zero_init_residual=cfg.zero_init_residual
    )
    if cfg.stem == "cifar":  # 32x32 inputs: no 4x downsampling before the first stage
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    built: nn.Module = model
    return built

"""The model factory: a small 1-D CNN whose convolution blocks can be recomputed in backward."""

from __future__ import annotations

from torch import nn


class ConvBlock(nn.Module):
    """Convolution, batch norm, ReLU; halves the length."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels_in, channels_out, 5, stride=2, padding=2)
        self.norm = nn.BatchNorm1d(channels_out)
        self.act = nn.ReLU()

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.act(self.norm(self.conv(x)))


class WaveNet(nn.Module):
    """Blocks of ConvBlock, global average pooling and a linear head: logits of the classes."""

    def __init__(self, channels: int = 32, depth: int = 3, classes: int = 4) -> None:
        super().__init__()
        widths = [1] + [channels] * depth
        pairs = zip(widths, widths[1:], strict=False)
        self.blocks = nn.Sequential(*(ConvBlock(a, b) for a, b in pairs))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(self.blocks(x).mean(dim=-1))

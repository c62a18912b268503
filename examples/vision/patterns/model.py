"""The model factory: a small CNN for small images (three stages of convolutions, each halving the
resolution after the first, global average pooling, a linear head)."""

from __future__ import annotations

from torch import nn


class ConvBlock(nn.Module):
    """3x3 convolution, batch norm, ReLU; `stride` 2 halves the resolution."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels_out)
        self.act = nn.ReLU()

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.act(self.norm(self.conv(x)))


class SmallCNN(nn.Module):
    """Widths `width`, 2x`width`, 4x`width` at full, half and quarter resolution: logits of the
    `classes`."""

    def __init__(self, width: int = 16, classes: int = 6) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            ConvBlock(3, width),
            ConvBlock(width, 2 * width, stride=2),
            ConvBlock(2 * width, 2 * width),
            ConvBlock(2 * width, 4 * width, stride=2),
            ConvBlock(4 * width, 4 * width),
        )
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(self.blocks(x).mean(dim=(2, 3)))

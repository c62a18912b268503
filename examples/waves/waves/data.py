"""The data factory: noisy waveforms of four shapes, generated from a seed (no download)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

SHAPES = ("sine", "square", "pulse", "sawtooth")


class Waves(Dataset):
    """`n` one-channel signals of `length` points and their shape labels."""

    def __init__(self, n: int, length: int, noise: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(len(SHAPES), (n,), generator=g)
        t = torch.linspace(0, 1, length)
        cycles = 1 + 3 * torch.rand(n, 1, generator=g)  # 1 to 4 periods per signal
        phase = torch.rand(n, 1, generator=g)
        u = (cycles * t + phase) % 1.0  # position within the period, in [0, 1)
        waves = torch.stack(
            [
                torch.sin(2 * math.pi * u),
                torch.where(u < 0.5, 1.0, -1.0),
                torch.where(u < 0.2, 1.0, -0.25),  # a narrow pulse once per period
                2 * u - 1,
            ]
        )  # (shapes, n, length)
        clean = waves[self.labels, torch.arange(n)]
        amplitude = 0.5 + torch.rand(n, 1, generator=g)
        self.signals = (amplitude * clean + noise * torch.randn(n, length, generator=g))[:, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.signals[i], int(self.labels[i])


def make_waves(
    train_samples: int = 4096,
    eval_samples: int = 1024,
    length: int = 64,
    noise: float = 0.4,
    seed: int = 1234,
) -> dict:
    """The training and evaluation splits (different seeds) and the number of classes."""
    return {
        "train": Waves(train_samples, length, noise, seed),
        "eval": Waves(eval_samples, length, noise, seed + 1),
        "num_classes": len(SHAPES),
    }

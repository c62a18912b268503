"""Random inputs and labels, generated per index from a fixed seed: runs any recipe without data."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from launcher.config.components import SyntheticConfig
from launcher.data import DataSpec, Splits


class SyntheticDataset(Dataset[tuple[torch.Tensor, int]]):
    """Sample i is always the same tensor; nothing is held in memory."""

    def __init__(self, size: int, shape: tuple[int, ...], classes: int, seed: int) -> None:
        self.size, self.shape, self.classes, self.seed = size, shape, classes, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        label = int(torch.randint(self.classes, (1,), generator=g))
        return torch.randn(self.shape, generator=g), label


def spec(cfg: SyntheticConfig) -> DataSpec:
    return DataSpec(tuple(cfg.input_shape), cfg.num_classes)


def epoch_samples(cfg: SyntheticConfig) -> tuple[int, str]:
    return cfg.train_samples, " (data.train_samples, synthetic)"


def build(cfg: SyntheticConfig) -> Splits:
    shape = tuple(cfg.input_shape)
    return Splits(
        train=SyntheticDataset(cfg.train_samples, shape, cfg.num_classes, seed=1),
        eval=SyntheticDataset(cfg.eval_samples, shape, cfg.num_classes, seed=2),
        spec=spec(cfg),
    )

"""An in-memory dataset that returns whole micro-batches by indexing (no per-sample Python)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class TensorPairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(inputs, labels) held in memory; `ds[index_array]` returns a batch."""

    batched = True  # the loader passes whole index arrays

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: np.ndarray | int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(index)
        return self.x[idx], self.y[idx]

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
        if isinstance(index, (int, np.integer)):
            return self.x[index], self.y[index]
        # index_select: the same rows as x[idx], without advanced indexing's general machinery
        # (2-3x faster on CPU for a micro-batch of rows; bench/README.md, issue 33)
        idx = torch.as_tensor(index, dtype=torch.long)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

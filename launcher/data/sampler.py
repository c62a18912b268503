"""Exact, resumable global-batch sampling across ranks and accumulation steps.

The sample stream is one seeded permutation of the training set per epoch, concatenated. Optimizer
step s consumes stream positions [s*G, (s+1)*G) for global batch G, whatever the world size or
accumulation: rank r takes the r-th contiguous slice of G / world positions and splits it into
micro-batches in order. So the samples of every step depend only on (seed, G), and a run can
resume from any step, at any world size, by its consumed-sample count.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from launcher.data.budget import split_by_tokens, to_count


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of epoch `epoch`: the same on every rank and every restart."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class GlobalBatchSampler:
    """Yields this rank's micro-batches (index arrays), `accumulation` per optimizer step."""

    def __init__(
        self,
        num_samples: int,
        *,
        global_batch: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        steps: int,
        start_step: int = 0,
        start_position: int | None = None,
    ) -> None:
        per_device, rem = divmod(global_batch, world_size)
        if rem or per_device % micro_batch:
            raise ValueError(
                f"global batch {global_batch} does not split into micro-batches of {micro_batch} "
                f"on {world_size} ranks"
            )
        self.n = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.per_device = per_device
        self.rank = rank
        self.seed = seed
        self.steps = steps
        self.start_step = start_step
        # stream position of step `start_step`: start_step x G unless the global batch changed
        self.start_position = (
            start_step * global_batch if start_position is None else start_position
        )
        self._perms: dict[int, np.ndarray] = {}

    def _positions(self, start: int, count: int) -> np.ndarray:
        """Dataset indices at stream positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.n)
            if epoch not in self._perms:
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch}
                self._perms[epoch] = epoch_permutation(self.n, self.seed, epoch)
            take = min(count - done, self.n - offset)
            out[done : done + take] = self._perms[epoch][offset : offset + take]
            done += take
        return out

    def __len__(self) -> int:
        return (self.steps - self.start_step) * (self.per_device // self.micro_batch)

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(self.steps - self.start_step):
            first = self.start_position + k * self.global_batch
            mine = self._positions(first + self.rank * self.per_device, self.per_device)
            for j in range(0, self.per_device, self.micro_batch):
                yield mine[j : j + self.micro_batch]


def eval_shards(num_samples: int, world_size: int, rank: int, batch: int) -> list[np.ndarray]:
    """This rank's eval batches: indices rank, rank + world, ... (each sample exactly once)."""
    mine = np.arange(rank, num_samples, world_size)
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


class BudgetSampler(GlobalBatchSampler):
    """GlobalBatchSampler's steps, each rank's share cut into micro-batches by a token budget
    (launcher/data/budget.py): grouped by length, at most `budget` padded tokens and
    `micro_batch` samples each, and as many micro-batches on every rank (the most any rank needs
    this step; each rank splits every rank's share, so no collective is needed). `step_sizes()`
    gives, step by step, how many micro-batches this rank yields and their real and padded
    token counts (the loop reads it beside the batches)."""

    def __init__(self, num_samples: int, *, lengths: np.ndarray, budget: int, **kw: int) -> None:
        super().__init__(num_samples, **kw)
        self.lengths, self.budget = lengths, budget
        # the loader's sampler and the loop's step_sizes() each walk the steps: split them once
        self._split = functools.lru_cache(maxsize=64)(self._split)  # type: ignore[method-assign]

    def _split(self, step: int) -> list[np.ndarray]:
        """This rank's micro-batches (dataset indices) of optimizer step start_step + step."""
        first = self.start_position + step * self.global_batch
        shares = [
            self._positions(first + r * self.per_device, self.per_device)
            for r in range(self.global_batch // self.per_device)
        ]
        splits = []
        for share in shares:
            lengths = [int(n) for n in self.lengths[share]]
            splits.append(_capped(split_by_tokens(lengths, self.budget), self.micro_batch))
        count = max(len(s) for s in splits)
        mine = shares[self.rank]
        lengths = [int(n) for n in self.lengths[mine]]
        return [mine[b] for b in to_count(lengths, splits[self.rank], count)]

    def __len__(self) -> int:
        return sum(len(self._split(k)) for k in range(self.steps - self.start_step))

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(self.steps - self.start_step):
            yield from self._split(k)

    def step_sizes(self) -> Iterator[tuple[int, int, int]]:
        """(micro-batches, real tokens, padded token slots) of this rank, step by step."""
        for k in range(self.steps - self.start_step):
            batches = self._split(k)
            real = sum(int(self.lengths[b].sum()) for b in batches)
            slots = sum(len(b) * int(self.lengths[b].max()) for b in batches)
            yield len(batches), real, slots


def _capped(batches: list[list[int]], cap: int) -> list[list[int]]:
    """Micro-batches of at most `cap` samples: a larger one cut into pieces of `cap` (in order,
    longest first, so the padded size only falls)."""
    return [b[i : i + cap] for b in batches for i in range(0, len(b), cap)]

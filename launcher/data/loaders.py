"""The loaders that feed the plan's micro-batches: a map-style dataset through the global-batch
sampler (launcher/data/sampler.py; by a token budget: BudgetSampler), a stream through each
reader's share (launcher/data/stream.py), both as (inputs, targets) batches (batches.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from launcher.config.components import DataConfig
from launcher.data.sampler import BudgetSampler, GlobalBatchSampler, eval_shards
from launcher.errors import ConfigError


@dataclass(frozen=True)
class LoaderSettings:
    """DataLoader options of a data config (in-memory data sets have no workers)."""

    workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2
    persistent_workers: bool = False


def loader_settings(cfg: DataConfig, device: str) -> LoaderSettings:
    """The data config's loader options for training on `device` (pin_memory auto = on CUDA)."""
    pin = getattr(cfg, "pin_memory", "auto")
    return LoaderSettings(
        workers=getattr(cfg, "workers", 0),
        pin_memory=device == "cuda" if pin == "auto" else bool(pin),
        prefetch_factor=getattr(cfg, "prefetch_factor", 2),
        persistent_workers=getattr(cfg, "persistent_workers", False),
    )


def make_loader(
    dataset: Any,
    batches: Any,
    settings: LoaderSettings = LoaderSettings(),
    collate: Any = None,
) -> Any:
    """A DataLoader over `batches` (an iterable of index arrays, one per micro-batch), each
    batch `(inputs, targets)` (launcher/data/batches.py `Collate`: yours, or torch's default)."""
    from torch.utils.data import DataLoader

    from launcher.data.batches import Collate  # heavy: torch

    if getattr(dataset, "batched", False):  # in memory: index the whole batch at once
        return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=settings.pin_memory)
    return DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate or Collate(None), **_options(settings)
    )


def _share_loader(share: Any, settings: LoaderSettings) -> Any:
    """A DataLoader over a stream's share (launcher/data/stream.py): whole micro-batches."""
    from torch.utils.data import DataLoader

    from launcher.data.stream import same  # heavy: torch

    return DataLoader(share, batch_size=None, collate_fn=same, **_options(settings))


def _options(settings: LoaderSettings) -> dict[str, Any]:
    """A DataLoader's worker and memory options from the settings."""
    workers = settings.workers
    return {
        "num_workers": workers,
        "persistent_workers": settings.persistent_workers and workers > 0,
        "prefetch_factor": settings.prefetch_factor if workers else None,
        "pin_memory": settings.pin_memory,
    }


@dataclass(frozen=True)
class Source:
    """The training or evaluation data as the loaders read it: a map-style dataset or a stream
    (`stream`; `sized`: its len() says its samples per pass, else trainer.samples does) and the
    collate that makes its batches (inputs, targets)."""

    dataset: Any
    collate: Any
    stream: bool = False
    sized: bool = True
    budget: int = 0  # data.micro_batch_tokens: micro-batches by a token budget (sampler.py)
    lengths: Any = None  # with a budget: every sample's length (data/lengths.py)


def source_of(dataset: Any, collate: Any) -> Source:
    """`dataset` as the loaders read it, its batches made by `collate` (batches.py Collate)."""
    from launcher.data.stream import is_stream, stream_len  # heavy: torch

    stream = is_stream(dataset)
    return Source(dataset, collate, stream, not stream or stream_len(dataset) is not None)


def as_source(data: Any) -> Source:
    """A Source as it is; a dataset as one (torch's default collate)."""
    from launcher.data.batches import Collate  # heavy: torch

    return data if isinstance(data, Source) else source_of(data, Collate(None))


def train_loader(
    source: Source | Any,
    plan: Any,
    rank: int,
    seed: int,
    start_step: int = 0,
    settings: LoaderSettings = LoaderSettings(),
    snapshots: Any = None,
) -> Any:
    """This rank's micro-batches of the plan's global batches, from optimizer step `start_step`
    (one pass over the rest of the run: its workers need not persist). A stream resumes from
    the saved place `snapshots` holds at that step, if any (launcher/data/stream.py)."""
    source = as_source(source)
    settings = dataclasses.replace(settings, persistent_workers=False)
    start = plan.samples_at(start_step)
    if source.stream:
        from launcher.data.stream import Layout, Snapshots, TrainShare  # heavy: torch

        snapshots = snapshots if snapshots is not None else Snapshots()
        layout = Layout(
            plan.global_batch,
            plan.micro_batch,
            plan.world_size,
            rank,
            start,
            plan.steps - start_step,
        )
        share = TrainShare(
            source.dataset,
            layout,
            plan.epoch_samples,
            source.sized,
            source.collate,
            snapshots.at(start),
        )
        return snapshots.batches(_share_loader(share, settings), _stream_error)

    kw = dict(
        global_batch=plan.global_batch,
        micro_batch=plan.micro_batch,
        world_size=plan.world_size,
        rank=rank,
        seed=seed,
        steps=plan.steps,
        start_step=start_step,
        start_position=start,
    )
    if source.budget:
        budgeted = BudgetSampler(
            len(source.dataset), lengths=source.lengths, budget=source.budget, **kw
        )
        return Budgeted(make_loader(source.dataset, budgeted, settings, source.collate), budgeted)
    sampler = GlobalBatchSampler(len(source.dataset), **kw)
    return make_loader(source.dataset, sampler, settings, source.collate)


class Budgeted:
    """The micro-batches of a token-budget run, with how many make each step (`next_step`) and
    the padding they carried since `padding()` was last read."""

    def __init__(self, loader: Any, sampler: Any) -> None:
        self._batches = iter(loader)
        self._sizes = sampler.step_sizes()
        self.real = self.slots = 0

    def __iter__(self) -> Budgeted:
        return self

    def __next__(self) -> Any:
        return next(self._batches)

    def next_step(self) -> int:
        """The number of micro-batches of the next step (its padding counted)."""
        count, real, slots = next(self._sizes)
        self.real, self.slots = self.real + real, self.slots + slots
        return int(count)

    def padding(self) -> float | None:
        """The share of padded token slots since the last call (None: no step since)."""
        if not self.slots:
            return None
        share = 1 - self.real / self.slots
        self.real = self.slots = 0
        return share


def _stream_error(message: str) -> Exception:
    return ConfigError(f"data: {message}")


def eval_loader(
    source: Source | Any, plan: Any, rank: int, settings: LoaderSettings = LoaderSettings()
) -> Any:
    """This rank's share of the evaluation split, each sample exactly once over all ranks;
    iterate it once per evaluation (persistent workers are then reused)."""
    source = as_source(source)
    if source.stream:
        from launcher.data.stream import EvalShare, Snapshots  # heavy: torch

        share = EvalShare(source.dataset, plan.world_size, rank, plan.micro_batch, source.collate)
        loader = _share_loader(share, settings)
        return _Replayable(lambda: Snapshots().batches(loader, _stream_error))
    shards = eval_shards(len(source.dataset), plan.world_size, rank, plan.micro_batch)
    return make_loader(source.dataset, shards, settings, source.collate)


def first_samples(source: Source, n: int) -> tuple[Any, Any]:
    """A batch (inputs, targets) of the training data's first `n` samples (repeated if it has
    fewer): what the batch-size advice times micro-steps on."""
    if source.stream:
        import itertools

        from launcher.data.stream import _iterate  # heavy: torch

        first = list(itertools.islice(_iterate(source.dataset), n))
        return source.collate([first[i % len(first)] for i in range(n)])  # type: ignore[no-any-return]
    import numpy as np

    loader = make_loader(
        source.dataset, [np.arange(n) % len(source.dataset)], collate=source.collate
    )
    return next(iter(loader))  # type: ignore[no-any-return]


class _Replayable:
    """An iterable that makes a fresh iterator each time (one per evaluation)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self) -> Any:
        return iter(self.make())

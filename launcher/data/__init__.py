"""Datasets by name, their shapes, and the loaders that feed the plan's micro-batches."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from launcher.config.components import DataConfig, UserDataConfig

# name -> module with `build(cfg) -> Splits` and `epoch_samples(cfg) -> (int, str)`
DATASETS = {
    "mnist1d": "launcher.data.mnist1d",
    "synthetic": "launcher.data.synthetic",
    "imagefolder": "launcher.data.imagefolder",
    "cifar10": "launcher.data.cifar10",
    "text": "launcher.data.text",
}


IGNORE_INDEX = -100  # a target left out of the loss and of its count (F.cross_entropy's default)


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its inputs."""

    input_shape: tuple[int, ...]
    num_classes: int | None  # labels; for token data the vocabulary; None: not declared (yours)
    tokens: bool = False  # inputs are token ids and every position has a target (a language model)
    example: tuple[Any, Any] | None = dataclasses.field(default=None, compare=False)
    """one real (input, target) pair of your data (data/user.py): probe batches repeat it"""
    top_target: int | None = None
    """the largest integer target of your data's samples the launcher read (train[0], eval[0])"""
    collate: Any = dataclasses.field(default=None, compare=False)
    """your collate_fn (data/user.py): probe batches are `sample` n times through it"""
    sample: Any = dataclasses.field(default=None, compare=False)
    """with a collate_fn: the worst-case sample (the longest) the probe measures"""
    worst: str = ""
    """with a collate_fn: how the worst-case sample was found, for the plan's memory row"""
    longest: int = 0
    """with a collate_fn: the worst-case sample's length in tokens"""

    def describe(self) -> str:
        """The shapes and dtypes of one sample, for cache keys and messages."""
        if self.collate is not None:
            return f"collated samples, inputs {self.input_shape} ({self.worst})"
        if self.example is None:
            return f"inputs {self.input_shape}, {self.num_classes} classes, tokens={self.tokens}"
        x, y = self.example
        return f"inputs {tuple(x.shape)} {x.dtype}, targets {tuple(y.shape)} {y.dtype}"


def fake_batch(spec: DataSpec, n: int, device: Any, dtype: Any) -> tuple[Any, Any]:
    """`n` samples shaped as the data's (memory probes): your data's first sample repeated, or
    random inputs and targets for a built-in data set."""
    import torch

    if spec.collate is not None:
        from launcher.data.batches import Collate, to_device

        batch = Collate(spec.collate).pair(spec.collate([spec.sample] * n))
        return to_device(batch, device, dtype)
    if spec.example is not None:
        x, y = (t.unsqueeze(0).expand(n, *t.shape).to(device).clone() for t in spec.example)
        return (x.to(dtype) if x.is_floating_point() else x), y
    labels = (n, *spec.input_shape) if spec.tokens else (n,)
    y = torch.randint(spec.num_classes, labels, device=device)
    if spec.tokens:
        return torch.randint(spec.num_classes, labels, device=device), y
    return torch.randn(n, *spec.input_shape, device=device, dtype=dtype), y


@dataclass(frozen=True)
class Splits:
    train: Any  # a map-style torch Dataset, or a stream (launcher/data/stream.py)
    eval: Any
    spec: DataSpec
    collate: Any = None  # your collate_fn (data/user.py), None: torch's default

    def sources(self, shift: bool = False, budget: int = 0) -> tuple[Source, Source]:
        """(train, eval) as the loaders read them; `shift`: a causal language model's labels
        (launcher/data/batches.py); `budget`: training micro-batches by tokens."""
        from launcher.data.batches import Collate
        from launcher.data.stream import is_stream, stream_len

        collate = Collate(self.collate, shift)
        train, evaluation = (
            Source(d, collate, is_stream(d), is_stream(d) and stream_len(d) is not None)
            for d in (self.train, self.eval)
        )
        if budget:
            from launcher.data.lengths import lengths

            every = np.asarray(lengths(self.train), dtype=np.int64)
            train = dataclasses.replace(train, budget=budget, lengths=every)
        return train, evaluation

    def epoch(self) -> tuple[int, str]:
        """(samples per epoch, where that comes from); 0 for a stream without len() (its epoch
        is trainer.samples)."""
        from launcher.data.stream import is_stream, stream_len

        if not is_stream(self.train):
            return len(self.train), " (counted in the training split)"
        n = stream_len(self.train)
        if n is None:
            return 0, " (a stream without len())"
        return n, " (the len() of the training stream)"


def _module(cfg: DataConfig) -> Any:
    if isinstance(cfg, UserDataConfig):
        return importlib.import_module("launcher.data.user")
    return importlib.import_module(DATASETS[cfg.name])


def build_splits(cfg: DataConfig) -> Splits:
    """Load (or generate) the train and eval splits."""
    return _module(cfg).build(cfg)


def data_spec(cfg: DataConfig) -> DataSpec:
    """Input shape and classes (for probing and plan_only estimates): from the config alone for a
    built-in data set, from the first training sample for yours."""
    return _module(cfg).spec(cfg)


def loading(cfg: DataConfig, world_size: int) -> tuple[str, str] | None:
    """The plan's `data` row for your data when it is streamed or collated (value, reason);
    None for a map-style dataset of fixed-shape pairs."""
    if not isinstance(cfg, UserDataConfig):
        return None
    from launcher.data.stream import is_stream

    splits = build_splits(cfg)
    parts = []
    if splits.collate is not None:
        parts.append(
            f"batches made by your collate_fn; a memory probe batch is the worst case, "
            f"{splits.spec.worst}"
        )
    if is_stream(splits.train):
        readers = world_size * max(cfg.workers, 1)
        saves = callable(getattr(splits.train, "state_dict", None))
        resume = (
            "a resume loads the stream's saved place (its state_dict()) at the checkpoint"
            if saves
            else "a resume reads the stream again up to the checkpoint's sample (it has no "
            "state_dict())"
        )
        parts.insert(
            0,
            f"a stream in its own order: each of {readers} reader(s) ({world_size} rank(s) x "
            f"{max(cfg.workers, 1)} loader process(es)) reads all of it and keeps its share; "
            + resume,
        )
    if cfg.pack_length:
        parts.append(
            f"your documents packed in order into sequences of {cfg.pack_length} tokens "
            "(data.pack_length); a target that starts a document is left out of the loss"
        )
    if not parts:
        return None
    kind = "packed" if cfg.pack_length else "collated"
    return ("stream" if is_stream(splits.train) else kind), "; ".join(parts)


def declared_epoch_samples(cfg: DataConfig) -> tuple[int, str]:
    """(samples per epoch, where that number comes from); a built-in data set says it without
    loading any data, yours is built (once per process) and counted."""
    return _module(cfg).epoch_samples(cfg)


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
        pin_memory=device == "cuda" if pin == "auto" else pin,
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

    from launcher.data.batches import Collate

    if getattr(dataset, "batched", False):  # in memory: index the whole batch at once
        return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=settings.pin_memory)
    workers = settings.workers
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate or Collate(None),
        num_workers=workers,
        persistent_workers=settings.persistent_workers and workers > 0,
        prefetch_factor=settings.prefetch_factor if workers else None,
        pin_memory=settings.pin_memory,
    )


def _share_loader(share: Any, settings: LoaderSettings) -> Any:
    """A DataLoader over a stream's share (launcher/data/stream.py): whole micro-batches."""
    from torch.utils.data import DataLoader

    from launcher.data.stream import same

    workers = settings.workers
    return DataLoader(
        share,
        batch_size=None,
        collate_fn=same,
        num_workers=workers,
        persistent_workers=settings.persistent_workers and workers > 0,
        prefetch_factor=settings.prefetch_factor if workers else None,
        pin_memory=settings.pin_memory,
    )


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


def as_source(data: Any) -> Source:
    """A Source as it is; a dataset as one (torch's default collate)."""
    if isinstance(data, Source):
        return data
    from launcher.data.batches import Collate
    from launcher.data.stream import is_stream, stream_len

    stream = is_stream(data)
    return Source(data, Collate(None), stream, not stream or stream_len(data) is not None)


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
        from launcher.data.stream import Layout, Snapshots, TrainShare

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

    from launcher.data.sampler import BudgetSampler, GlobalBatchSampler

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
    from launcher.errors import ConfigError

    return ConfigError(f"data: {message}")


def eval_loader(
    source: Source | Any, plan: Any, rank: int, settings: LoaderSettings = LoaderSettings()
) -> Any:
    """This rank's share of the evaluation split, each sample exactly once over all ranks;
    iterate it once per evaluation (persistent workers are then reused)."""
    source = as_source(source)
    if source.stream:
        from launcher.data.stream import EvalShare, Snapshots

        share = EvalShare(source.dataset, plan.world_size, rank, plan.micro_batch, source.collate)
        loader = _share_loader(share, settings)
        return _Replayable(lambda: Snapshots().batches(loader, _stream_error))
    from launcher.data.sampler import eval_shards

    shards = eval_shards(len(source.dataset), plan.world_size, rank, plan.micro_batch)
    return make_loader(source.dataset, shards, settings, source.collate)


def first_samples(source: Source, n: int) -> tuple[Any, Any]:
    """A batch (inputs, targets) of the training data's first `n` samples (repeated if it has
    fewer): what the batch-size advice times micro-steps on."""
    if source.stream:
        import itertools

        from launcher.data.stream import _iterate

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

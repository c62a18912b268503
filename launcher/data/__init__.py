"""Datasets by name, their shapes, how the plan says they are read; the loaders that feed the
plan's micro-batches are in launcher/data/loaders.py (named here as well)."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from launcher.config.components import DataConfig, UserDataConfig

# the loaders (launcher/data/loaders.py), named here as well: what the phases and tests import
from launcher.data.loaders import (
    Budgeted,
    LoaderSettings,
    Source,
    as_source,
    eval_loader,
    first_samples,
    loader_settings,
    make_loader,
    source_of,
    train_loader,
)
from launcher.data.targets import IGNORE_INDEX

# name -> module with `build(cfg) -> Splits` and `epoch_samples(cfg) -> (int, str)`
DATASETS = {
    "mnist1d": "launcher.data.mnist1d",
    "synthetic": "launcher.data.synthetic",
    "imagefolder": "launcher.data.imagefolder",
    "cifar10": "launcher.data.cifar10",
    "text": "launcher.data.text",
}


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
        from launcher.data.batches import Collate, to_device  # heavy: torch

        batch = Collate(spec.collate).pair(spec.collate([spec.sample] * n))
        return to_device(batch, device, dtype)
    if spec.example is not None:
        x, y = (t.unsqueeze(0).expand(n, *t.shape).to(device).clone() for t in spec.example)
        return (x.to(dtype) if x.is_floating_point() else x), y
    classes = spec.num_classes
    assert classes is not None  # a built-in data set declares its classes
    labels = (n, *spec.input_shape) if spec.tokens else (n,)
    y = torch.randint(classes, labels, device=device)
    if spec.tokens:
        return torch.randint(classes, labels, device=device), y
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
        from launcher.data.batches import Collate  # heavy: torch

        collate = Collate(self.collate, shift)
        train, evaluation = source_of(self.train, collate), source_of(self.eval, collate)
        if budget:
            from launcher.data.lengths import lengths  # heavy: torch

            every = np.asarray(lengths(self.train), dtype=np.int64)
            train = dataclasses.replace(train, budget=budget, lengths=every)
        return train, evaluation

    def epoch(self) -> tuple[int, str]:
        """(samples per epoch, where that comes from); 0 for a stream without len() (its epoch
        is trainer.samples)."""
        from launcher.data.stream import is_stream, stream_len  # heavy: torch

        if not is_stream(self.train):
            return len(self.train), " (counted in the training split)"
        n = stream_len(self.train)
        if n is None:
            return 0, " (a stream without len())"
        return n, " (the len() of the training stream)"


class DatasetModule(Protocol):
    """What a data set's module (DATASETS, launcher/data/user.py) defines."""

    def build(self, cfg: Any) -> Splits: ...
    def spec(self, cfg: Any) -> DataSpec: ...
    def epoch_samples(self, cfg: Any) -> tuple[int, str]: ...


def _module(cfg: DataConfig) -> DatasetModule:
    name = "launcher.data.user" if isinstance(cfg, UserDataConfig) else DATASETS[cfg.name]
    return cast(DatasetModule, importlib.import_module(name))


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
    from launcher.data.stream import is_stream  # heavy: torch

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
            + (f"{cfg.workers} DataLoader worker(s)" if cfg.workers else "its training process")
            + ") reads all of it and keeps its share; "
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


__all__ = [
    "IGNORE_INDEX",
    "Budgeted",
    "DataSpec",
    "LoaderSettings",
    "Source",
    "Splits",
    "as_source",
    "build_splits",
    "data_spec",
    "declared_epoch_samples",
    "eval_loader",
    "fake_batch",
    "first_samples",
    "loader_settings",
    "loading",
    "make_loader",
    "train_loader",
]

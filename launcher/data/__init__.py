"""Datasets by name, their shapes, and the loaders that feed the plan's micro-batches."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

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

    def describe(self) -> str:
        """The shapes and dtypes of one sample, for cache keys and messages."""
        if self.example is None:
            return f"inputs {self.input_shape}, {self.num_classes} classes, tokens={self.tokens}"
        x, y = self.example
        return f"inputs {tuple(x.shape)} {x.dtype}, targets {tuple(y.shape)} {y.dtype}"


def fake_batch(spec: DataSpec, n: int, device: Any, dtype: Any) -> tuple[Any, Any]:
    """`n` samples shaped as the data's (memory probes): your data's first sample repeated, or
    random inputs and targets for a built-in data set."""
    import torch

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
    train: Any  # a map-style torch Dataset
    eval: Any
    spec: DataSpec


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


def to_device(batch: Any, device: Any, dtype: Any) -> tuple[Any, Any]:
    """A batch (inputs, targets) on `device`, floating-point inputs cast to `dtype`."""
    import torch

    x, y = batch
    x = x.to(device, non_blocking=True)
    if x.is_floating_point():
        x = x.to(dtype)
    return x, torch.as_tensor(y).to(device, non_blocking=True)


def make_loader(dataset: Any, batches: Any, settings: LoaderSettings = LoaderSettings()) -> Any:
    """A DataLoader over `batches` (an iterable of index arrays, one per micro-batch)."""
    from torch.utils.data import DataLoader

    if getattr(dataset, "batched", False):  # in memory: index the whole batch at once
        return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=settings.pin_memory)
    workers = settings.workers
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        persistent_workers=settings.persistent_workers and workers > 0,
        prefetch_factor=settings.prefetch_factor if workers else None,
        pin_memory=settings.pin_memory,
    )


def train_loader(
    dataset: Any,
    plan: Any,
    rank: int,
    seed: int,
    start_step: int = 0,
    settings: LoaderSettings = LoaderSettings(),
) -> Any:
    """This rank's micro-batches of the plan's global batches, from optimizer step `start_step`
    (one pass over the rest of the run: its workers need not persist)."""
    from launcher.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(
        len(dataset),
        global_batch=plan.global_batch,
        micro_batch=plan.micro_batch,
        world_size=plan.world_size,
        rank=rank,
        seed=seed,
        steps=plan.steps,
        start_step=start_step,
        start_position=plan.samples_at(start_step),
    )
    return make_loader(dataset, sampler, dataclasses.replace(settings, persistent_workers=False))


def eval_loader(
    dataset: Any, plan: Any, rank: int, settings: LoaderSettings = LoaderSettings()
) -> Any:
    """This rank's share of the evaluation split, each sample exactly once over all ranks;
    iterate it once per evaluation (persistent workers are then reused)."""
    from launcher.data.sampler import eval_shards

    shards = eval_shards(len(dataset), plan.world_size, rank, plan.micro_batch)
    return make_loader(dataset, shards, settings)

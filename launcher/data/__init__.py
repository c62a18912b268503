"""Datasets by name, their shapes, and the loaders that feed the plan's micro-batches."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from launcher.config import DataConfig

# name -> module with `build(cfg) -> Splits` and `epoch_samples(cfg) -> (int, str)`
DATASETS = {
    "mnist1d": "launcher.data.mnist1d",
    "synthetic": "launcher.data.synthetic",
    "imagefolder": "launcher.data.imagefolder",
}


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its inputs."""

    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class Splits:
    train: Any  # a map-style torch Dataset
    eval: Any
    spec: DataSpec


def _module(cfg: DataConfig) -> Any:
    return importlib.import_module(DATASETS[cfg.name])


def build_splits(cfg: DataConfig) -> Splits:
    """Load (or generate) the train and eval splits."""
    return _module(cfg).build(cfg)


def data_spec(cfg: DataConfig) -> DataSpec:
    """Input shape and classes from the config alone (for probing and plan_only estimates)."""
    return _module(cfg).spec(cfg)


def declared_epoch_samples(cfg: DataConfig) -> tuple[int, str]:
    """(samples per epoch, where that number comes from) without loading any data."""
    return _module(cfg).epoch_samples(cfg)


def make_loader(dataset: Any, batches: Any, workers: int = 0, pin_memory: bool = False) -> Any:
    """A DataLoader over `batches` (an iterable of index arrays, one per micro-batch)."""
    from torch.utils.data import DataLoader

    if getattr(dataset, "batched", False):  # in-memory: index the whole batch at once
        return DataLoader(dataset, sampler=batches, batch_size=None)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=pin_memory,
    )


def train_loader(
    dataset: Any,
    plan: Any,
    rank: int,
    seed: int,
    start_step: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
) -> Any:
    """This rank's micro-batches of the plan's global batches, from optimizer step `start_step`."""
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
    return make_loader(dataset, sampler, workers, pin_memory)


def eval_loader(
    dataset: Any, plan: Any, rank: int, workers: int = 0, pin_memory: bool = False
) -> Any:
    """This rank's share of the evaluation split, each sample exactly once over all ranks."""
    from launcher.data.sampler import eval_shards

    shards = eval_shards(len(dataset), plan.world_size, rank, plan.micro_batch)
    return make_loader(dataset, shards, workers, pin_memory)

"""Sample lengths of variable-length data (a collate_fn pads them): the worst case the memory
probe measures, and the lengths token-budget micro-batches are cut by."""

from __future__ import annotations

from typing import Any

import torch

from launcher.data.stream import _iterate, is_stream

STREAM_LOOK = 1000  # samples of a stream read for its longest (a stream cannot be scanned whole)


def length_of(sample: Any) -> int:
    """A sample's length in tokens: its input's first dimension (a dict's input_ids)."""
    x = sample
    if isinstance(sample, dict):
        x = sample["input_ids"] if "input_ids" in sample else next(iter(sample.values()))
    elif isinstance(sample, (tuple, list)) and len(sample) == 2:
        x = sample[0]
    t = torch.as_tensor(x)
    return int(t.shape[0]) if t.dim() else 1


_LAST: list[Any] = []  # (dataset, its lengths): the probe, the plan and the loader read them


def lengths(dataset: Any) -> list[int]:
    """Every sample's length of a map-style dataset (a Hugging Face dataset's input_ids column
    is read at once); read once per dataset."""
    if _LAST and _LAST[0] is dataset:
        return list(_LAST[1])
    found = _read(dataset)
    _LAST[:] = [dataset, found]
    return list(found)


def _read(dataset: Any) -> list[int]:
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list) and "input_ids" in columns:
        return [len(ids) for ids in dataset["input_ids"]]
    return [length_of(dataset[i]) for i in range(len(dataset))]


def longest(dataset: Any) -> tuple[Any, int, str]:
    """(the longest sample, its length, how it was found): of all samples of a map-style
    dataset, of the first STREAM_LOOK of a stream (a longer one later is an out-of-memory
    risk the OOM-safe step handles)."""
    if is_stream(dataset):
        best, top, seen = None, -1, 0
        for seen, sample in enumerate(_iterate(dataset), 1):
            if length_of(sample) > top:
                best, top = sample, length_of(sample)
            if seen == STREAM_LOOK:
                break
        return best, top, f"the longest of the stream's first {seen:,} samples"
    all_lengths = lengths(dataset)
    i = max(range(len(all_lengths)), key=all_lengths.__getitem__)
    return dataset[i], all_lengths[i], f"the longest of all {len(all_lengths):,} training samples"

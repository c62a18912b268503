"""Iterable datasets (streams) cut into exact global batches, with a resumable position.

A stream has no indices to shuffle, so its order is its own (shuffle it yourself, e.g. a Hugging
Face dataset's `.shuffle(seed)`; `set_epoch(pass)` is called before each pass when it has one).
Its samples take global positions 0, 1, 2, ... pass after pass, and the plan's global order is
the same as a map-style dataset's (launcher/data/sampler.py): optimizer step s takes positions
[P_s, P_s + G) (P_s: the samples consumed before it), rank r the r-th contiguous slice of G/world,
cut into micro-batches in order. So the samples of every step depend on nothing but the stream
and the global batch: a run resumes at any world size at the same sample (Megatron's
consumed-samples accounting).

Every reader (each rank, and each DataLoader worker of a rank) reads the stream from the start
and keeps its own share: micro-batch m of a rank goes to its worker m mod workers, which is the
order torch's DataLoader returns them in. Reading costs every reader the whole stream; the plan
says so. A resumed run skips to its position by reading, or, for a stream that saves its place
(`state_dict()` / `load_state_dict()`, as Hugging Face's iterable datasets do), by loading the
stream's state at the checkpoint's position: each reader snapshots it at every step boundary,
which it passes anyway, and the snapshot travels with the step's last micro-batch.

A pass that runs dry before its planned samples, or that yields more than a stream's len() says,
ends the run in one line (`StreamError`, a ConfigError in the training process).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launcher import log
from launcher.types.state import StreamPlace


class StreamError(ValueError):
    """A stream that does not hold what the plan needs (the message says what and where)."""


def is_stream(dataset: Any) -> bool:
    """An iterable dataset: torch's IterableDataset (Hugging Face's iterable datasets are one),
    or anything iterable without `[i]`."""
    if isinstance(dataset, IterableDataset):
        return True
    return hasattr(dataset, "__iter__") and not hasattr(dataset, "__getitem__")


def stream_len(dataset: Any) -> int | None:
    """The stream's len(), or None: an unsized stream (its epoch is trainer.samples)."""
    try:
        return int(len(dataset))
    except TypeError:
        return None


def _iterate(source: Any) -> Iterator[Any]:
    """The source's samples in order. A Hugging Face iterable dataset is read through its
    batched `iter` (one sample per batch), which, unlike `iter(dataset)`, does not give a
    DataLoader worker only some of its shards: every reader must see the whole stream."""
    if type(source).__module__.startswith("datasets.") and hasattr(source, "iter"):
        for batch in source.iter(batch_size=1):
            yield {k: v[0] for k, v in batch.items()}
        return
    yield from source


def digest(sample: Any) -> int:
    """A 31-bit digest of a sample's contents (its structure, tensors' dtypes, shapes and bytes):
    what a saved place is checked by, and what the ranks compare."""
    h = hashlib.blake2b(digest_size=8)
    _digest_into(h, sample)
    return int.from_bytes(h.digest()[:4], "little") & 0x7FFFFFFF


def _digest_into(h: Any, x: Any) -> None:
    if isinstance(x, Mapping):
        for key in sorted(x, key=str):
            h.update(f"{key!s}:".encode())
            _digest_into(h, x[key])
    elif isinstance(x, (list, tuple)):
        h.update(f"[{len(x)}".encode())
        for item in x:
            _digest_into(h, item)
    elif isinstance(x, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(x).detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(x).encode())


class Reader:
    """Reads a stream sample by sample from global position `start`, pass after pass (`epoch`
    samples each; a sized stream must hold exactly that many). From a saved place (`state`, a
    snapshot) it loads the stream's state and checks that the sample it then gives is the one
    saved with it; if not (a Hugging Face shuffle buffer is not saved, for one), it reads up to
    `start` instead and says so in `notice`."""

    def __init__(
        self, source: Any, epoch: int, sized: bool, start: int, state: StreamPlace | None
    ) -> None:
        self.source, self.epoch, self.sized = source, epoch, sized
        self.notice = ""
        self._ahead: list[Any] = []  # the sample at `position`, read ahead by snapshot()
        self.position = start - start % epoch
        self._open()
        usable = state is not None and state.get("state") is not None
        if start % epoch and usable and state is not None and state["position"] == start:
            loaded = self._load(state)
            if loaded:
                return
        self.skip(start % epoch)

    def _open(self) -> None:
        """A new pass of the stream, at `position` (a pass's start)."""
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.position // self.epoch)
        self._it = _iterate(self.source)
        self._opened = self.position

    def _load(self, state: StreamPlace) -> bool:
        loaded = _copy(self.source)  # the original stays unloaded, to read from instead
        try:
            loaded.load_state_dict(state["state"])
            self._it = _iterate(loaded)
            first = next(self._it, _END)
            why = "does not give the sample saved with it (a shuffle buffer's contents are not "
            why += "saved, for one)"
        except Exception as exc:  # a state the stream no longer takes (its code changed)
            first, why = _END, f"does not load ({type(exc).__name__}: {exc})"
        if first is not _END and digest(first) == state["digest"]:
            self.source = loaded
            self.position, self._ahead = state["position"], [first]
            return True
        self.notice = (
            f"launcher: the stream's saved place at sample {state['position']:,} {why}; "
            "reading the stream up to it instead"
        )
        self._open()
        return False

    def read(self) -> Any:
        """The sample at `position`; the position moves on by one."""
        if self._ahead:
            self.position += 1
            return self._ahead.pop()
        if self.position % self.epoch == 0 and self.position != self._opened:
            self._end_of_pass()
        sample = next(self._it, _END)
        if sample is _END:
            offset = self.position % self.epoch
            said = "its len() says" if self.sized else "trainer.samples or trainer.tokens plans"
            raise StreamError(
                f"the stream ran dry after {offset:,} samples of pass {self.position // self.epoch}"
                f" (global sample {self.position:,}); {said} {self.epoch:,} per pass"
            )
        self.position += 1
        return sample

    def _end_of_pass(self) -> None:
        """A new pass starts here: a sized stream must have ended exactly at its len()."""
        if self.sized and next(self._it, _END) is not _END:
            raise StreamError(
                f"the stream yields more than its len() ({self.epoch:,}) samples in pass "
                f"{self.position // self.epoch - 1}: len() must count what it yields"
            )
        self._open()

    def skip(self, count: int) -> None:
        for _ in range(count):
            self.read()

    def snapshot(self) -> StreamPlace | None:
        """The place at `position` for a checkpoint: the stream's own state (None if it has no
        state_dict()) and the digest of the sample there (read ahead: the next read gives it).
        None at a pass's start (a new pass starts over) or at the stream's end."""
        if not self.position or self.position % self.epoch == 0 or self._ahead:
            return None
        saves = callable(getattr(self.source, "state_dict", None))
        state = self.source.state_dict() if saves else None
        if not _plain(state):  # a checkpoint is read with weights_only=True: plain data only
            state = None
        sample = next(self._it, _END)
        if sample is _END:
            return None
        self._ahead = [sample]
        return {"position": self.position, "state": state, "digest": digest(sample)}


_END = object()  # a stream's end, from next(iterator, _END)


def _plain(state: Any) -> bool:
    """Whether a stream's state is data a checkpoint holds and loads with weights_only=True
    (dicts, lists, tuples, strings, numbers, booleans, None, tensors): another one (numpy
    arrays, objects) is not kept, and a resume reads the stream up to its place instead."""
    if isinstance(state, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return all(_plain(v) for v in state)
    return state is None or isinstance(state, (str, int, float, bool, torch.Tensor))


def _copy(source: Any) -> Any:
    """A copy of a stream to load a saved place into: deep, as loading a Hugging Face dataset's
    state changes objects a shallow copy shares (its tables are mapped, not copied); shallow
    where a stream cannot be deep-copied."""
    try:
        return copy.deepcopy(source)
    except Exception:
        return copy.copy(source)


@dataclass(frozen=True)
class Layout:
    """Which stream positions this rank's micro-batches hold (launcher/data/sampler.py's order)."""

    global_batch: int
    micro_batch: int
    world_size: int
    rank: int
    start: int  # the global position of the first step's first sample
    steps: int  # optimizer steps from there

    @property
    def per_device(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accumulation(self) -> int:
        return self.per_device // self.micro_batch

    def first(self, m: int) -> int:
        """The global position of micro-batch m's first sample."""
        step, j = divmod(m, self.accumulation)
        return (
            self.start
            + step * self.global_batch
            + self.rank * self.per_device
            + j * self.micro_batch
        )


class _Message:
    """A reader's StreamError (`fatal`) or notice, carried to the training process as an item
    (a worker's exception would arrive wrapped in its traceback)."""

    def __init__(self, text: str, fatal: bool) -> None:
        self.text, self.fatal = text, fatal


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainShare(IterableDataset):  # type: ignore[type-arg]
    """This rank's micro-batches of a stream, each `(batch, snapshot or None)`; this worker's
    every workers-th one."""

    def __init__(
        self,
        source: Any,
        layout: Layout,
        epoch: int,
        sized: bool,
        collate: Callable[[list[Any]], Any],
        state: StreamPlace | None = None,
    ) -> None:
        self.source, self.layout, self.epoch, self.sized = source, layout, epoch, sized
        self.collate, self.state = collate, state

    def __iter__(self) -> Iterator[Any]:
        w, workers = _worker()
        lay = self.layout
        try:
            reader = Reader(self.source, self.epoch, self.sized, lay.start, self.state)
            if reader.notice:
                yield _Message(reader.notice, fatal=False)
            for m in range(w, lay.steps * lay.accumulation, workers):
                reader.skip(lay.first(m) - reader.position)
                batch = self.collate([reader.read() for _ in range(lay.micro_batch)])
                snapshot = None
                if m % lay.accumulation == lay.accumulation - 1:  # the step's end: its place
                    end = lay.start + (m // lay.accumulation + 1) * lay.global_batch
                    reader.skip(end - reader.position)
                    snapshot = reader.snapshot()
                yield batch, snapshot
        except StreamError as exc:
            yield _Message(str(exc), fatal=True)


class EvalShare(IterableDataset):  # type: ignore[type-arg]
    """This rank's evaluation batches of a stream (one pass: samples rank, rank + world, ...,
    each exactly once over the ranks), this worker's every workers-th batch."""

    def __init__(
        self,
        source: Any,
        world_size: int,
        rank: int,
        batch: int,
        collate: Callable[[list[Any]], Any],
    ) -> None:
        self.source, self.world, self.rank, self.batch = source, world_size, rank, batch
        self.collate = collate

    def __iter__(self) -> Iterator[Any]:
        w, workers = _worker()
        mine: list[Any] = []
        number = 0
        for position, sample in enumerate(_iterate(self.source)):
            if position % self.world != self.rank:
                continue
            mine.append(sample)
            if len(mine) == self.batch:
                if number % workers == w:
                    yield self.collate(mine), None
                mine, number = [], number + 1
        if mine and number % workers == w:
            yield self.collate(mine), None


class Snapshots:
    """The streams' saved places the training process has received, by global position (the
    checkpoint of a step takes the one at its consumed samples)."""

    def __init__(self) -> None:
        self.found: dict[int, StreamPlace] = {}

    def at(self, position: int) -> StreamPlace | None:
        return self.found.get(position)

    def batches(self, items: Any, on_error: Callable[[str], Exception]) -> Iterator[Any]:
        """The batches of a share's loader; snapshots kept (the latest few), a reader's
        StreamError raised as `on_error(message)`."""
        said: set[str] = set()
        for item in items:
            if isinstance(item, _Message):
                if item.fatal:
                    raise on_error(item.text)
                if item.text not in said:  # once, not once per reader
                    log.warn(item.text)
                    said.add(item.text)
                continue
            batch, snapshot = item
            if snapshot is not None:
                self.found[snapshot["position"]] = snapshot
                for old in sorted(self.found)[:-4]:
                    del self.found[old]
            yield batch


def same(item: Any) -> Any:
    """A share loader's collate_fn: items are whole micro-batches already."""
    return item

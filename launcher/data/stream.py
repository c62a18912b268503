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

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info


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


class Reader:
    """Reads a stream sample by sample from global position `start`, pass after pass (`epoch`
    samples each; a sized stream must hold exactly that many)."""

    def __init__(
        self, source: Any, epoch: int, sized: bool, start: int, state: dict[str, Any] | None
    ) -> None:
        self.source, self.epoch, self.sized = source, epoch, sized
        self.resumed_by = "reading"
        self._open(start // epoch)
        if start % epoch and state is not None and state.get("position") == start:
            self.source.load_state_dict(state["state"])
            self._it = _iterate(self.source)
            self.position = start
            self.resumed_by = "state"
        else:  # the pass's start, then read on to `start`
            self.position = start - start % epoch
            self.skip(start % epoch)

    def _open(self, number: int) -> None:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(number)
        self._it = _iterate(self.source)

    def read(self) -> Any:
        """The sample at `position`; the position moves on by one."""
        if self.position and self.position % self.epoch == 0:
            self._end_of_pass()
        try:
            sample = next(self._it)
        except StopIteration:
            offset = self.position % self.epoch
            said = "its len() says" if self.sized else "trainer.samples plans"
            raise StreamError(
                f"the stream ran dry after {offset:,} samples of pass {self.position // self.epoch}"
                f" (global sample {self.position:,}); {said} {self.epoch:,} per pass"
            ) from None
        self.position += 1
        return sample

    def _end_of_pass(self) -> None:
        """A new pass starts here: a sized stream must have ended exactly at its len()."""
        if self.sized:
            try:
                next(self._it)
            except StopIteration:
                pass
            else:
                raise StreamError(
                    f"the stream yields more than its len() ({self.epoch:,}) samples in pass "
                    f"{self.position // self.epoch - 1}: len() must count what it yields"
                )
        self._open(self.position // self.epoch)

    def skip(self, count: int) -> None:
        for _ in range(count):
            self.read()

    def snapshot(self) -> dict[str, Any] | None:
        """The stream's own saved place at `position`, for a checkpoint; None if it has none."""
        if not callable(getattr(self.source, "state_dict", None)) or not self.position:
            return None
        if self.position % self.epoch == 0:  # a new pass starts over: no state is needed
            return None
        return {"position": self.position, "state": self.source.state_dict()}


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


class _Failed:
    """A reader's StreamError, carried to the training process as an item (a worker's exception
    would arrive wrapped in its traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


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
        state: dict[str, Any] | None = None,
    ) -> None:
        self.source, self.layout, self.epoch, self.sized = source, layout, epoch, sized
        self.collate, self.state = collate, state

    def __iter__(self) -> Iterator[Any]:
        w, workers = _worker()
        lay = self.layout
        try:
            reader = Reader(self.source, self.epoch, self.sized, lay.start, self.state)
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
            yield _Failed(str(exc))


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
        self.found: dict[int, dict[str, Any]] = {}

    def at(self, position: int) -> dict[str, Any] | None:
        return self.found.get(position)

    def batches(self, items: Any, on_error: Callable[[str], Exception]) -> Iterator[Any]:
        """The batches of a share's loader; snapshots kept (the latest few), a reader's
        StreamError raised as `on_error(message)`."""
        for item in items:
            if isinstance(item, _Failed):
                raise on_error(item.message)
            batch, snapshot = item
            if snapshot is not None:
                self.found[snapshot["position"]] = snapshot
                for old in sorted(self.found)[:-4]:
                    del self.found[old]
            yield batch


def same(item: Any) -> Any:
    """A share loader's collate_fn: items are whole micro-batches already."""
    return item

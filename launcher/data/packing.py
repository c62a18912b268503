"""Packing: a stream of tokenized documents cut into fixed-length training sequences.

Documents of every length are concatenated, in order, into one token stream, and the stream is cut
into packs of `length` tokens, as `launcher/data/text.py` cuts its byte stream: pack k is
inputs = tokens [k*L, (k+1)*L) and targets = tokens [k*L + 1, (k+1)*L + 1). Every pack holds
exactly L positions, so a global batch counted in tokens is exact whatever the documents' lengths,
and no position is padding.

What packing must not do is teach the model to predict one document's first token from the end of
another (unrelated) document: a target whose token starts a document is IGNORE_INDEX (left out of
the loss and of the counted targets, launcher/models/loss.py). A target inside a document is kept
even across a pack's edge: the last position of a pack predicts the first token of the next pack
when both belong to the same document. Attention is not masked at the boundaries (the usual
trade-off of packing: a position may attend to the previous document's tokens, but it is never
trained to predict across the boundary).

Only whole packs are produced: pack k exists iff (k + 1) * L + 1 <= the stream's tokens (its last
target needs one token beyond it); the tokens after the last whole pack are dropped, as text.py
drops its tail (`packs_in` counts them). The packer is lazy: between packs it holds at most L
pending tokens besides the document being read, so it packs an unbounded stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from launcher.data.stream import StreamError, _iterate, is_stream
from launcher.data.targets import IGNORE_INDEX
from launcher.data.tensors import TensorPairs

DOCUMENT = "a document is a 1-D sequence of integer token ids >= 0, or a dict with 'input_ids'"


def packs_in(total_tokens: int, length: int) -> int:
    """Whole packs of `length` in a stream of `total_tokens` tokens: pack k needs tokens up to
    (k + 1) * length inclusive (its last target), the same count as text.py's `sequences`."""
    if length < 1:
        raise ValueError(f"pack length {length}: must be at least 1")
    return max(0, (total_tokens - 1) // length)


def _describe(doc: Any) -> str:
    """What a document is, for the error that refuses it."""
    kind = type(doc).__name__
    if isinstance(doc, (torch.Tensor, np.ndarray)):
        return f"a {kind} of shape {tuple(doc.shape)} and dtype {doc.dtype}"
    if isinstance(doc, Mapping):
        return f"a {kind} without 'input_ids' (keys: {', '.join(map(repr, list(doc)[:8]))})"
    return f"a {kind}: {str(doc)[:60]!r}"


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _tensor(ids: Any) -> torch.Tensor | None:
    """`ids` as a tensor when it is one or converts to 1-D integers (or nothing); else None."""
    if isinstance(ids, torch.Tensor):
        return ids
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError):  # ragged nested lists and the like
        return None
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        return None
    return torch.from_numpy(array.astype(np.int64))


def as_tokens(doc: Any, index: int) -> torch.Tensor:
    """Document `index` of the stream as a 1-D int64 CPU tensor (possibly empty); ValueError
    naming the index and what the document is when it is not 1-D integer token ids >= 0."""
    ids = doc["input_ids"] if isinstance(doc, Mapping) and "input_ids" in doc else doc
    tokens = _tensor(ids)
    if tokens is None or tokens.ndim != 1 or (tokens.numel() and not _integer(tokens)):
        raise ValueError(f"document {index} is {_describe(doc)}; {DOCUMENT}")
    tokens = tokens.to("cpu", torch.int64)
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(
            f"document {index} holds token id {int(tokens.min())}; {DOCUMENT} (a negative id "
            f"such as {IGNORE_INDEX} is a label, not a token)"
        )
    return tokens


def pack(documents: Iterable[Any], length: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) packs of `length` int64 tokens from `documents`, lazily (see the module's
    docstring). Empty documents have no tokens and change nothing; a document that is not 1-D
    integer token ids raises ValueError naming its index in `documents` when it is reached."""
    if length < 1:  # here, not in the generator: refused at the call, before any iteration
        raise ValueError(f"pack length {length}: must be at least 1")
    return _packs(iter(documents), length)


def _packs(documents: Iterator[Any], length: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    chunks: list[torch.Tensor] = []  # the pending tokens, fewer than length + 1 between packs
    firsts: list[torch.Tensor] = []  # per token: it begins a document (its target is ignored)
    pending = 0
    for index, doc in enumerate(documents):
        new = as_tokens(doc, index)
        if not new.numel():
            continue
        first = torch.zeros(new.numel(), dtype=torch.bool)
        first[0] = True
        chunks.append(new)
        firsts.append(first)
        pending += new.numel()
        whole = packs_in(pending, length)
        if not whole:  # joined only when a pack is complete: many short documents stay cheap
            continue
        tokens, starts = torch.cat(chunks), torch.cat(firsts)
        for k in range(whole):
            yield _one(tokens, starts, k * length, length)
        # the last target of the last pack is the next pack's first input: it stays pending
        chunks, firsts = [tokens[whole * length :].clone()], [starts[whole * length :].clone()]
        pending = chunks[0].numel()


def _one(
    tokens: torch.Tensor, starts: torch.Tensor, at: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pack whose first input is `tokens[at]`: targets that start a document are ignored."""
    inputs = tokens[at : at + length].clone()
    nxt = slice(at + 1, at + length + 1)
    targets = torch.where(starts[nxt], IGNORE_INDEX, tokens[nxt])
    return inputs, targets


class PackedStream(IterableDataset):  # type: ignore[type-arg]
    """A stream of documents as a stream of packs (each reader packs the whole stream in order,
    so every reader's pack k is the same). No saved place: a resume re-packs up to it."""

    def __init__(self, documents: Any, length: int) -> None:
        self.documents, self.length = documents, length

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.documents, "set_epoch"):
            self.documents.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from pack(_iterate(self.documents), self.length)
        except ValueError as exc:
            raise StreamError(str(exc)) from None


def packed(documents: Any, length: int) -> Any:
    """Your documents as packs: a stream's lazily (PackedStream), a map-style dataset's all at
    once, in its order, into memory (TensorPairs: the sampler shuffles the packs)."""
    if is_stream(documents):
        return PackedStream(documents, length)
    packs = list(pack((documents[i] for i in range(len(documents))), length))
    if not packs:
        return TensorPairs(torch.zeros(0, length, dtype=torch.long), torch.zeros(0, length))
    return TensorPairs(torch.stack([x for x, _ in packs]), torch.stack([y for _, y in packs]))

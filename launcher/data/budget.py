"""Token-budget micro-batches: one step's samples grouped by length under a padded-token budget.

Variable-length samples are padded to the longest in their micro-batch, so a fixed count of
samples per micro-batch both wastes compute on padding (a long sample pads all the short ones
beside it) and must be sized for the worst case (a micro-batch of the longest samples). With a
budget of N tokens per micro-batch instead (fairseq's max_tokens), micro-batches of short samples
hold many and those of long samples few, and grouping by length keeps the padding small.

What does not change is the global batch: the step's samples are the ones the global order gives
this rank (launcher/data/sampler.py); only how they are split into forward/backward passes
differs, and the loss is normalised by the global batch's counted targets, so the gradient is the
same. The number of micro-batches then varies by step and by rank; `to_count` splits a rank's
micro-batches further so that every rank can run the same number (what DDP's gradient
synchronisation on the last micro-batch needs).

Pure: lengths in, positions out; `expected_padding` / `fixed_padding` estimate, for the plan, the
padding fraction of both ways from a sample of the data's lengths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class OverBudget(ValueError):
    """A sample longer than the token budget: no micro-batch can hold it."""

    def __init__(self, length: int, budget: int) -> None:
        super().__init__(
            f"a sample of {length} tokens is longer than the token budget of {budget} per "
            "micro-batch"
        )
        self.length, self.budget = length, budget


def _check(lengths: Sequence[int], budget: int) -> None:
    if budget < 1:
        raise ValueError(f"token budget {budget}: must be at least 1")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"sample {i} has length {n}: a sample holds at least one token")
    longest = max(lengths, default=0)
    if longest > budget:
        raise OverBudget(longest, budget)


def split_by_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Micro-batches (lists of positions into `lengths`, each position exactly once) whose padded
    size, len(micro-batch) x its longest length, is at most `budget`.

    The algorithm: sort the positions by length, longest first (stable: equal lengths keep the
    stream's order), then walk them, adding each to the current micro-batch while the padded size
    stays within the budget, else starting a new one. The first sample of a micro-batch is its
    longest, so its padded size is known as it grows, and neighbours in the order have similar
    lengths: little padding. Deterministic: the same lengths give the same micro-batches.
    Raises OverBudget (a ValueError) when the longest sample alone exceeds the budget.
    """
    _check(lengths, budget)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def to_count(lengths: Sequence[int], batches: list[list[int]], count: int) -> list[list[int]]:
    """`batches` split further into exactly `count` micro-batches (e.g. the most any rank has this
    step, so that every rank runs as many forward/backward passes): the one with the largest padded
    size is halved (the longer half first) until there are `count`. Halving never breaks the
    budget, and no micro-batch is empty, so `count` is at most the number of samples."""
    if not len(batches) <= count <= len(lengths):
        raise ValueError(
            f"{len(batches)} micro-batches of {len(lengths)} samples cannot become {count}"
        )
    out = [list(b) for b in batches]
    while len(out) < count:
        padded = [len(b) * max(lengths[i] for i in b) if len(b) > 1 else 0 for b in out]
        j = padded.index(max(padded))
        half = (len(out[j]) + 1) // 2
        out[j : j + 1] = [out[j][:half], out[j][half:]]
    return out


def _slots(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(padding slots, all slots) of `batches` padded to their longest sample."""
    padding = slots = 0
    for b in batches:
        size = len(b) * max(lengths[i] for i in b)
        slots += size
        padding += size - sum(lengths[i] for i in b)
    return padding, slots


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of the padded token slots of `batches` that hold padding, not a token."""
    if not batches or not all(batches):
        raise ValueError("no micro-batch, or an empty one: there is no padding fraction to give")
    padding, slots = _slots(lengths, batches)
    return padding / slots


def _steps(
    lengths_sample: Sequence[int], per_device_batch: int, draws: int, seed: int
) -> Iterator[list[int]]:
    """`draws` steps of `per_device_batch` lengths drawn with replacement from the sample (the
    same steps for the same seed, so both ways below are compared on the same data)."""
    if not lengths_sample or per_device_batch < 1 or draws < 1:
        raise ValueError(
            f"{len(lengths_sample)} sample lengths, {per_device_batch} per step, {draws} draws: "
            "each must be at least 1"
        )
    rng = np.random.default_rng(seed)
    sample = np.asarray(lengths_sample, dtype=np.int64)
    for _ in range(draws):
        yield [int(n) for n in rng.choice(sample, per_device_batch)]


def expected_padding(
    lengths_sample: Sequence[int], per_device_batch: int, budget: int, draws: int, seed: int
) -> float:
    """The padding fraction token-budget micro-batches are expected to have: over `draws` random
    steps, padding slots / all slots (pooled over the steps, as a run's logged fraction is, so a
    step of long samples weighs what it costs)."""
    padding = slots = 0
    for step in _steps(lengths_sample, per_device_batch, draws, seed):
        p, s = _slots(step, split_by_tokens(step, budget))
        padding, slots = padding + p, slots + s
    return padding / slots


def fixed_padding(
    lengths_sample: Sequence[int], per_device_batch: int, micro_batch: int, draws: int, seed: int
) -> float:
    """The same for fixed-size micro-batches of `micro_batch` samples in the stream's order, each
    padded to its own longest sample (a padding collate), on the same draws for the same seed."""
    if micro_batch < 1 or per_device_batch % micro_batch:
        raise ValueError(
            f"micro-batch {micro_batch} does not divide the per-device batch {per_device_batch}"
        )
    padding = slots = 0
    for step in _steps(lengths_sample, per_device_batch, draws, seed):
        fixed = [range(i, i + micro_batch) for i in range(0, per_device_batch, micro_batch)]
        p, s = _slots(step, fixed)
        padding, slots = padding + p, slots + s
    return padding / slots

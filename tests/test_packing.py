"""Packing documents into fixed-length sequences (launcher/data/packing.py): exact against a naive
reference, no target across a document boundary, lazy on an unbounded stream, bad documents
named by their index (issue 31)."""

from __future__ import annotations

import itertools
from collections import UserDict

import numpy as np
import pytest
import torch

from launcher.data import IGNORE_INDEX
from launcher.data.packing import pack, packs_in


def _reference(docs: list[list[int]], length: int) -> list[tuple[list[int], list[int]]]:
    """The definition, spelled out: one stream with a document id per token, cut into windows;
    a target whose token is of another document than its input is ignored."""
    tokens = [t for doc in docs for t in doc]
    owner = [d for d, doc in enumerate(docs) for _ in doc]
    packs = []
    k = 0
    while (k + 1) * length + 1 <= len(tokens):
        window = range(k * length, (k + 1) * length)
        inputs = [tokens[j] for j in window]
        targets = [tokens[j + 1] if owner[j + 1] == owner[j] else IGNORE_INDEX for j in window]
        packs.append((inputs, targets))
        k += 1
    return packs


def _documents(seed: int, length: int, count: int = 60) -> list[list[int]]:
    """Documents of mixed lengths: empty, one token, short, and longer than a pack. Token
    j of document d is d * 10_000 + j, so a pair's document and order can be read off its ids."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice(
        [0, 1, 2, length - 1, length, length + 1, 3 * length + 2, int(rng.integers(1, 40))],
        count,
    )
    return [[d * 10_000 + j for j in range(max(0, int(n)))] for d, n in enumerate(sizes)]


def _plain(packs) -> list[tuple[list[int], list[int]]]:
    out = []
    for x, y in packs:
        assert x.dtype == y.dtype == torch.int64
        out.append((x.tolist(), y.tolist()))
    return out


@pytest.mark.parametrize("length", [1, 2, 7, 16])
@pytest.mark.parametrize("seed", range(4))
def test_packs_equal_the_naive_reference(seed, length):
    docs = _documents(seed, length)
    got = list(pack((torch.tensor(d, dtype=torch.int32) for d in docs), length))
    assert all(x.shape == y.shape == (length,) for x, y in got)
    assert _plain(got) == _reference(docs, length)
    assert len(got) == packs_in(sum(map(len, docs)), length)


@pytest.mark.parametrize("seed", range(3))
def test_no_target_crosses_a_document_and_every_pair_inside_the_window_counts(seed):
    length = 8
    docs = _documents(seed, length)
    packs = _plain(pack(docs, length))
    counted = 0
    for inputs, targets in packs:
        for x, y in zip(inputs, targets, strict=True):
            if y != IGNORE_INDEX:  # the same document (id // 10_000), the next token
                assert (y // 10_000, y) == (x // 10_000, x + 1)
                counted += 1
    # each document at stream positions [a, b) has pairs (j, j + 1) for j in [a, b - 1); those
    # whose input lies in the packed window [0, n * length) are the counted targets
    end, a, expected = len(packs) * length, 0, 0
    for doc in docs:
        b = a + len(doc)
        expected += max(0, min(b - 1, end) - a)
        a = b
    assert counted == expected > 0


def test_a_pack_s_last_target_is_the_next_pack_s_first_token_inside_a_document():
    (x0, y0), (x1, _) = list(pack([list(range(9))], 4))
    assert y0[-1] == x1[0] == 4
    (_, y0), _ = list(pack([[1, 2, 3, 4], [5, 6, 7, 8, 9]], 4))
    assert y0.tolist() == [2, 3, 4, IGNORE_INDEX]  # 5 starts the next document


def test_only_whole_packs_the_tail_is_dropped():
    assert packs_in(9, 4) == 2 and packs_in(8, 4) == 1 and packs_in(1, 4) == 0
    assert packs_in(0, 4) == 0
    assert len(list(pack([list(range(8))], 4))) == 1  # the 8th token has no target after it
    assert list(pack([[], [], [3]], 1)) == []


def test_an_unbounded_stream_is_packed_lazily():
    read = []

    def documents():
        for d in itertools.count():
            read.append(d)
            yield np.arange(3, dtype=np.uint8) + d  # numpy, unsigned bytes

    packs = list(itertools.islice(pack(documents(), 4), 5))
    assert len(packs) == 5
    assert len(read) == 7  # 5 packs of 4 need 21 tokens: 7 documents of 3, no more
    assert packs[0][0].tolist() == [0, 1, 2, 1]
    assert packs[0][1].tolist() == [1, 2, IGNORE_INDEX, 2]


def test_dict_documents_use_their_input_ids():
    docs = _documents(5, 6)
    dicts = [{"input_ids": d, "attention_mask": [1] * len(d)} for d in docs]
    encodings = [UserDict(input_ids=np.array(d, dtype=np.int64)) for d in docs]  # BatchEncoding
    expected = _reference(docs, 6)
    assert _plain(pack(dicts, 6)) == expected
    assert _plain(pack(encodings, 6)) == expected


@pytest.mark.parametrize(
    "bad, what",
    [
        (torch.ones(3), "a Tensor of shape (3,) and dtype torch.float32"),
        ([[1, 2], [3, 4]], "a list"),
        ("some text", "a str: 'some text'"),
        ({"text": "hi"}, "a dict without 'input_ids' (keys: 'text')"),
        (torch.tensor(5), "a Tensor of shape ()"),
        ([1, 2.5], "a list"),
        ([True, False], "a list"),
        ([[1], [2, 3]], "a list"),
        (None, "a NoneType"),
    ],
)
def test_a_document_that_is_not_token_ids_is_named_by_its_index(bad, what):
    docs = [[1, 2], [], [3], bad, [4]]
    with pytest.raises(ValueError, match=r"document 3 is ") as info:
        list(pack(docs, 2))
    assert what in str(info.value)
    assert "1-D sequence of integer token ids" in str(info.value)


def test_negative_ids_and_bad_lengths_are_refused():
    with pytest.raises(ValueError, match=r"document 1 holds token id -100"):
        list(pack([[1, 2], [3, -100]], 2))
    with pytest.raises(ValueError, match="pack length 0"):
        pack([[1, 2]], 0)  # at the call, before iterating
    with pytest.raises(ValueError, match="pack length 0"):
        packs_in(10, 0)


@pytest.mark.parametrize(
    ("length", "key", "samples"),
    [("trainer.tokens=800", "trainer.tokens", 100), ("trainer.samples=60", "trainer.samples", 60)],
)
def test_an_unsized_stream_s_epoch_names_the_key_that_stated_it(tmp_path, length, key, samples):
    """The plan's epoch row of a stream without len(): one pass is what trainer.tokens (in
    packs of data.pack_length) or trainer.samples states, and the row names that key."""
    from launcher.config.compose import compose_run
    from launcher.planning.tokens import in_samples
    from launcher.training.job_plan import unsized_epoch
    from tests.stream_project import write_project

    conf = write_project(tmp_path)
    cfg = compose_run(["+recipe=streamed", "data=documents", "+data.form=stream", length], conf)
    cfg = in_samples(cfg)  # as the run has it: tokens converted (launcher/training/job.py concrete)
    epoch, why = unsized_epoch(cfg.data, cfg.trainer, " (a stream without len())")
    assert epoch == samples
    assert why == f" (a stream without len(); one epoch = {key})"

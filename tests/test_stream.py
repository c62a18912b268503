"""Streams (iterable datasets) cut into exact global batches (launcher/data/stream.py, issue 31).

Every sample position goes to exactly one rank, worker and micro-batch, in the order of a
map-style dataset's global stream; a run resumes at the same sample on any world size, by
reading or from the stream's own saved place; a stream that runs dry or whose len() lies ends
the run in one line. Variable-length samples through a padding collate give, on 2 gloo ranks x
accumulation 4, the step of one large batch (float64, 1e-10)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from launcher.data import IGNORE_INDEX, LoaderSettings, Source, train_loader
from launcher.data.batches import Collate
from launcher.data.packing import PackedStream, pack
from launcher.data.stream import Snapshots, digest
from launcher.errors import ConfigError
from launcher.planning.plan import PlanInput, plan_batch
from tests.helpers import composed, free_port, sgd_step_on_rank


class Numbers(IterableDataset):
    """Samples (input [i], target i) for i < n; counts what each iterator read."""

    def __init__(self, n: int, sized: bool = True, length: int | None = None) -> None:
        self.n, self.sized, self.length = n, sized, length
        self.epochs: list[int] = []

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("unsized")
        return self.length if self.length is not None else self.n

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        for i in range(self.n):
            yield torch.tensor([i]), torch.tensor(i)


class Reads(list):
    """What every copy of a stream read (the launcher loads a saved place into a deep copy)."""

    def __deepcopy__(self, memo: dict) -> Reads:
        return self


class Saving(Numbers):
    """A stream that saves its place: loaded from a state, it starts there."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.at = 0
        self.start = 0
        self.reads = Reads()

    def state_dict(self) -> dict:
        return {"at": self.at}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["at"]

    def __iter__(self):
        for i in range(self.start, self.n):
            self.at = i + 1
            self.reads.append(i)
            yield torch.tensor([i]), torch.tensor(i)


def _sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([i]), torch.tensor(i)


def _plan(n: int, gb: int, micro: int, world: int, epochs: int = 2):
    cfg = composed(
        [f"global_batch={gb}", f"micro_batch={micro}", f"trainer.epochs={epochs}"]
        + ["optim.large_batch.enabled=false", "schedule.warmup_epochs=0"]
    )
    return plan_batch(PlanInput(cfg, world, n))


def _taken(stream, plan, rank: int, workers: int, step: int = 0, snapshots=None) -> list[list]:
    source = Source(stream, Collate(None), stream=True, sized=stream.sized)
    loading = LoaderSettings(workers=workers)
    batches = train_loader(source, plan, rank, 0, step, loading, snapshots)
    return [y.tolist() for _, y in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_position_goes_to_one_rank_in_the_global_order(workers):
    """2 ranks x 2 workers x accumulation 2, 2 passes of 24 samples (global batch 8): step s
    holds positions [8s, 8s + 8) mod 24, rank r the r-th half, in order, each once per pass."""
    n, plan = 24, _plan(24, 8, 2, 2)
    ranks = [_taken(Numbers(n), plan, r, workers) for r in range(2)]
    acc = plan.accumulation
    assert acc == 2 and plan.steps == 6
    order = []
    for step in range(plan.steps):
        for r in range(2):
            order += sum(ranks[r][step * acc : (step + 1) * acc], [])
    assert order == [p % n for p in range(2 * n)]


def test_a_resumed_stream_continues_at_the_same_sample_on_another_world_size():
    """From step 2 of a 2-rank plan, 1 rank takes what both ranks would have, in order."""
    n = 24
    both = [_taken(Numbers(n), _plan(n, 8, 2, 2), r, 0) for r in range(2)]
    one = _taken(Numbers(n), _plan(n, 8, 4, 1), 0, 0, step=2)
    expect = []
    for step in range(2, 6):
        expect += sum(both[0][2 * step : 2 * step + 2] + both[1][2 * step : 2 * step + 2], [])
    assert sum(one, []) == expect


def test_a_stream_that_saves_its_place_resumes_from_it_without_re_reading():
    """The place at step 2's position travels with step 1's last micro-batch (the stream's
    state and the digest of the sample there); a run resumed from it loads it, checks the
    sample, and reads nothing before its position."""
    n, plan = 40, _plan(40, 8, 4, 1, epochs=1)
    snapshots = Snapshots()
    full = _taken(Saving(n), plan, 0, 0, snapshots=snapshots)
    place = snapshots.at(24)
    assert place == {"position": 24, "state": {"at": 24}, "digest": digest(_sample(24))}
    again = Saving(n)
    kept = Snapshots()
    kept.found[24] = place
    tail = _taken(again, plan, 0, 0, step=3, snapshots=kept)
    assert tail == full[6:]
    assert again.reads == list(range(24, n))


def test_a_saved_place_that_does_not_resume_exactly_is_read_up_to_instead(monkeypatch):
    """A state that lands elsewhere (as a Hugging Face shuffle buffer's does) is caught by the
    sample's digest: the stream is read up to the position instead, with one line saying so
    (once, however many readers found it)."""
    said: list[str] = []
    monkeypatch.setattr("launcher.data.stream.log.warn", said.append)
    n, plan = 40, _plan(40, 8, 4, 1, epochs=1)
    full = _taken(Saving(n), plan, 0, 0)
    kept = Snapshots()
    kept.found[24] = {"position": 24, "state": {"at": 20}, "digest": digest(_sample(24))}
    again = Saving(n)
    assert _taken(again, plan, 0, 0, step=3, snapshots=kept) == full[6:]
    assert again.reads[:2] == [20, 0]  # tried the state, then read from the start
    assert _taken(Saving(n), plan, 0, 2, step=3, snapshots=kept) == full[6:]
    assert len(said) == 2 and "does not give the sample saved with it" in said[1], said
    # once per run: the second run's 2 workers each found it


class Unplain(Saving):
    """A stream whose state a checkpoint cannot hold (a numpy array), and one whose saved
    state no longer loads."""

    def state_dict(self) -> dict:
        return {"at": np.array(self.at)}


class Refusing(Saving):
    def load_state_dict(self, state: dict) -> None:
        raise KeyError("at")


def test_a_state_a_checkpoint_cannot_hold_or_that_does_not_load_is_read_up_to(monkeypatch):
    said: list[str] = []
    monkeypatch.setattr("launcher.data.stream.log.warn", said.append)
    n, plan = 40, _plan(40, 8, 4, 1, epochs=1)
    snapshots = Snapshots()
    full = _taken(Unplain(n), plan, 0, 0, snapshots=snapshots)
    assert snapshots.at(24)["state"] is None and snapshots.at(24)["digest"] == digest(_sample(24))
    kept = Snapshots()
    kept.found[24] = {"position": 24, "state": {"at": 24}, "digest": digest(_sample(24))}
    assert _taken(Refusing(n), plan, 0, 0, step=3, snapshots=kept) == full[6:]
    assert len(said) == 1 and "does not load (KeyError: 'at')" in said[0], said


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (
            Numbers(20, length=24),
            "the stream ran dry after 20 samples of pass 0 (global sample 20)"
            "; its len() says 24 per pass",
        ),
        (
            Numbers(28, length=24),
            "the stream yields more than its len() (24) samples in pass 0: len() must "
            "count what it yields",
        ),
        (
            Numbers(20, sized=False),
            "the stream ran dry after 20 samples of pass 0 (global sample "
            "20); trainer.samples or trainer.tokens plans 24 per pass",
        ),
    ],
    ids=["dry", "len-lies", "unsized-dry"],
)
def test_a_stream_that_does_not_hold_the_plan_ends_in_one_line(stream, message):
    plan = _plan(24, 8, 4, 1)
    with pytest.raises(ConfigError) as err:
        _taken(stream, plan, 0, 2)
    assert str(err.value) == f"data: {message}"


def _hf_stream(shuffle: bool):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"x": list(range(48))})
    stream = table.to_iterable_dataset(num_shards=4)
    return stream.shuffle(seed=1, buffer_size=8) if shuffle else stream


def _hf_collate(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[s["x"]] for s in samples]), torch.tensor([s["x"] for s in samples])


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffle-buffer"])
def test_a_hugging_face_stream_is_read_whole_by_every_worker_and_resumes_exactly(
    shuffle, monkeypatch
):
    """A Hugging Face iterable dataset of 4 shards read by 2 DataLoader workers (which it would
    otherwise split its shards between): the global order is its own, each pass whole; resumed
    at step 9 of 12 from its saved place, the rest is the same. Its shuffle buffer is not
    saved: then the place is caught by its digest and the stream read up to it."""
    plan = _plan(48, 8, 2, 2, epochs=2)
    said: list[str] = []
    monkeypatch.setattr("launcher.data.stream.log.warn", said.append)

    def taken(step: int, snapshots: Snapshots) -> list:
        source = Source(_hf_stream(shuffle), Collate(_hf_collate), stream=True, sized=True)
        loader = train_loader(source, plan, 0, 0, step, LoaderSettings(workers=2), snapshots)
        return [y.tolist() for _, y in loader]

    whole = Snapshots()
    full = taken(0, whole)
    if not shuffle:  # rank 0 of 2: the first half of each step's 8 samples, pass after pass
        assert full == [
            [8 * s % 48 + 2 * j, 8 * s % 48 + 2 * j + 1] for s in range(12) for j in (0, 1)
        ]
    kept = Snapshots()
    kept.found[72] = whole.at(72)
    assert kept.found[72] is not None and kept.found[72]["state"] is not None
    assert taken(9, kept) == full[18:]
    fell_back = any("does not give the sample" in line for line in said)
    assert fell_back == shuffle


# ------------------------------------------------ variable-length samples: the large batch
V, G = 9, 16  # vocabulary; the global batch (sequences)


class Documents(IterableDataset):
    """G sequences of lengths 1..8 (token ids), as Hugging Face would give them: dicts."""

    def __iter__(self):
        g = torch.Generator().manual_seed(3)
        for i in range(G):
            ids = torch.randint(V, (1 + i % 8,), generator=g)
            yield {"input_ids": ids, "labels": ids.clone()}


def pad(samples: list[dict]) -> dict:
    """A padding collate: input_ids padded with 0, labels with -100."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
        labels[i, : len(s["labels"])] = s["labels"]
    return {"input_ids": ids, "labels": labels}


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.emb(input_ids)))


PACK = 4  # tokens per packed sequence (72 tokens: 17 packs)


def _source(packed: bool) -> Source:
    """The padded stream of dict batches, or the same documents packed into PACK tokens."""
    if packed:
        return Source(PackedStream(Documents(), PACK), Collate(None), stream=True, sized=False)
    return Source(Documents(), Collate(pad), stream=True, sized=False)


def _reference(packed: bool) -> dict[str, torch.Tensor]:
    """One SGD step (lr 1) on the mean over every counted token of G sequences at once (the
    first G packs, for packing)."""
    model = Tagger().double()
    if packed:
        packs = list(itertools.islice(pack(Documents(), PACK), G))
        x, y = torch.stack([p[0] for p in packs]), torch.stack([p[1] for p in packs])
        assert len(packs) == G and (y == IGNORE_INDEX).any()  # boundaries inside the step
    else:
        batch = pad(list(Documents()))
        x, y = batch["input_ids"], batch["labels"]
    F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
    return {n: (p - p.grad).detach() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str, packed: bool) -> None:
    params = sgd_step_on_rank(rank, port, _source(packed), Tagger().double(), G, 2, workers=2)
    if rank == 0:
        torch.save(params, out)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_two_gloo_ranks_over_a_stream_match_one_large_batch(packed, tmp_path: Path):
    """2 ranks x 2 workers x micro 2 x accumulation 4 over a stream of sequences of 1-8 tokens,
    in dict batches padded per micro-batch, or packed into sequences of 4 tokens (no target
    across a document): the weights after the step are those of one large batch of the same 16
    sequences (float64, 1e-10)."""
    out = str(tmp_path / "params.pt")
    mp.spawn(_worker, args=(free_port(), out, packed), nprocs=2, join=True)
    got, ref = torch.load(out, weights_only=True), _reference(packed)
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-10, rtol=1e-10, msg=name)

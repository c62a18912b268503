"""Token-budget micro-batches in the loader and the loop (data.micro_batch_tokens, issue 31):
each step's samples are the global order's, whatever the budget; every rank runs as many
micro-batches; no micro-batch exceeds the budget; and on 2 gloo ranks a step over padded
variable-length samples is the step of one large batch (float64, 1e-10). Data the run cannot
take (a bad budget, a collate the model cannot take or without labels, a document that is not
token ids, packs beyond the model's context) is one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from launcher.cli import main
from launcher.data import Source
from launcher.data.batches import Collate
from launcher.data.sampler import BudgetSampler, GlobalBatchSampler
from tests.helpers import free_port, sgd_step_on_rank
from tests.stream_project import write_project
from tests.test_stream import Tagger, V, pad

LENGTHS = np.random.default_rng(3).lognormal(2.0, 0.8, 200).clip(2, 60).astype(np.int64)


def _sampler(rank: int, budget: int, micro: int = 8, **kw) -> BudgetSampler:
    return BudgetSampler(
        len(LENGTHS),
        lengths=LENGTHS,
        budget=budget,
        global_batch=16,
        micro_batch=micro,
        world_size=2,
        rank=rank,
        seed=5,
        steps=25,
        **kw,
    )


@pytest.mark.parametrize("budget", [60, 120, 480])
def test_a_budget_changes_the_split_never_the_samples_of_a_step(budget):
    plain = [
        list(
            GlobalBatchSampler(
                len(LENGTHS), global_batch=16, micro_batch=8, world_size=2, rank=r, seed=5, steps=25
            )
        )
        for r in range(2)
    ]
    for rank in range(2):
        sampler = _sampler(rank, budget)
        sizes = list(sampler.step_sizes())
        batches = iter(sampler)
        for step, (count, real, slots) in enumerate(sizes):
            mine = [next(batches) for _ in range(count)]
            assert sorted(np.concatenate(mine)) == sorted(plain[rank][step])  # micro 8 = 1 per step
            assert all(len(b) * LENGTHS[b].max() <= budget for b in mine)
            assert real == LENGTHS[np.concatenate(mine)].sum()
            assert slots == sum(len(b) * LENGTHS[b].max() for b in mine)
        assert next(batches, None) is None
    counts = [[c for c, _, _ in _sampler(r, budget).step_sizes()] for r in range(2)]
    assert counts[0] == counts[1]  # as many forward/backward passes on every rank
    assert len(set(counts[0])) > 1 or budget == 480  # it varies by step


def test_after_an_out_of_memory_re_split_no_micro_batch_holds_more_than_the_cap():
    for batch in _sampler(0, 480, micro=2):
        assert len(batch) <= 2


# -------------------------------------------------------------------- 2 gloo ranks: exact
G = 16


class Lengthy(torch.utils.data.Dataset):
    """G sequences of 1..15 tokens as dicts (a padding collate batches them)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(11)
        self.items = []
        for i in range(G):
            ids = torch.randint(V, (1 + (7 * i) % 15,), generator=g)
            self.items.append({"input_ids": ids, "labels": ids.clone()})

    def __len__(self) -> int:
        return G

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _reference() -> dict[str, torch.Tensor]:
    model = Tagger().double()
    batch = pad(Lengthy().items)
    F.cross_entropy(
        model(batch["input_ids"]).reshape(-1, V), batch["labels"].reshape(-1)
    ).backward()
    return {n: (p - p.grad).detach() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    data = Lengthy()
    lengths = np.array([len(s["input_ids"]) for s in data.items])
    budget = BudgetSampler(
        G,
        lengths=lengths,
        budget=30,
        global_batch=G,
        micro_batch=8,
        world_size=2,
        rank=rank,
        seed=0,
        steps=1,
    )
    assert next(budget.step_sizes())[0] >= 3  # the budget makes several micro-batches
    source = Source(data, Collate(pad), budget=30, lengths=lengths)
    params = sgd_step_on_rank(rank, port, source, Tagger().double(), G, 8)
    if rank == 0:
        torch.save(params, out)


@pytest.mark.slow
def test_two_gloo_ranks_with_a_token_budget_match_one_large_batch(tmp_path: Path):
    """16 sequences of 1-15 tokens, 2 ranks, micro-batches of at most 30 padded tokens (3 or
    more per rank, as many on both): the weights after the step are one large batch's."""
    out = str(tmp_path / "params.pt")
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    got, ref = torch.load(out, weights_only=True), _reference()
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-10, rtol=1e-10, msg=name)


# -------------------------------------------------------------------------------- bad input
COLLATED = "data._target_=streamproj.parts.make_collated"
BAD = [
    (
        ["data=sequences", "+data.micro_batch_tokens=50"],
        "data.micro_batch_tokens=50: smaller than the longest sample (60 tokens, the longest "
        "of all 256 training samples: 60 tokens); must be at least 60",
    ),
    (
        ["data=stream", "+data.micro_batch_tokens=500"],
        "data.micro_batch_tokens=500: needs map-style data of variable-length samples",
    ),
    (
        ["data=sequences", "+data.micro_batch_tokens=500", "ramp.start_batch=4", "ramp.samples=64"],
        "data.micro_batch_tokens=500: a batch ramp-up (ramp.start_batch) with token budgets "
        "is not supported",
    ),
    (
        [COLLATED],
        "TypeError: Tagger.forward() got an unexpected keyword argument 'extra' (on inputs "
        "input_ids (2, 12) torch.int64, extra (2,) torch.float32)",
    ),
    (
        [COLLATED, "+data.collate=no_labels"],
        "its collate_fn on [train[0]] gives a dict batch with keys ['input_ids'] has no 'labels'",
    ),
    (
        ["data=documents", "+data.bad_at=5"],
        "data.pack_length=8: document 5 is a Tensor of shape (1, 6)",
    ),
    (
        ["data=documents", "model=llama", "data.pack_length=128"],
        "data.pack_length=128: longer than the model's context of 64 positions",
    ),
]


@pytest.mark.parametrize(
    ("args", "message"),
    BAD,
    ids=[
        "budget-too-small",
        "budget-stream",
        "budget-ramp",
        "collate-extra-key",
        "collate-no-labels",
        "bad-document",
        "pack-beyond-context",
    ],
)
def test_data_that_cannot_apply_is_one_line_exit_2_nothing_written(
    args, message, streamproj, capsys
):
    code = main(
        ["--config-dir", str(streamproj / "proj" / "conf"), "+recipe=streamed", *args]
        + [f"memory.cache_dir={streamproj / 'cache'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in streamproj.iterdir()) == ["proj"]  # nothing written


@pytest.fixture
def streamproj(tmp_path, monkeypatch):
    """The stream project in tmp_path/proj, importable; the working folder tmp_path."""
    import sys

    write_project(tmp_path / "proj")
    monkeypatch.syspath_prepend(str(tmp_path / "proj"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("streamproj")]:
        del sys.modules[name]

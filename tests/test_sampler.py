"""Tests for GlobalBatchSampler (exact, layout-independent, resumable) and eval_shards."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.data.sampler import GlobalBatchSampler, epoch_permutation, eval_shards

SEED = 3


def _stream(n: int, start: int, count: int, seed: int = SEED) -> np.ndarray:
    """Stream positions [start, start + count): epoch permutations concatenated."""
    epochs = (start + count) // n + 1
    full = np.concatenate([epoch_permutation(n, seed, e) for e in range(epochs)])
    return full[start : start + count]


def _sampler(n, gb, micro, world, rank, steps, start_step=0) -> GlobalBatchSampler:
    return GlobalBatchSampler(
        n,
        global_batch=gb,
        micro_batch=micro,
        world_size=world,
        rank=rank,
        seed=SEED,
        steps=steps,
        start_step=start_step,
    )


def _steps(n, gb, micro, world, steps, start_step=0) -> list[np.ndarray]:
    """Per optimizer step: every rank's micro-batches concatenated in rank order."""
    accum = gb // world // micro
    per_rank = []
    for rank in range(world):
        batches = list(_sampler(n, gb, micro, world, rank, steps, start_step))
        assert all(len(b) == micro for b in batches)
        assert len(batches) == (steps - start_step) * accum
        per_rank.append(
            [np.concatenate(batches[i : i + accum]) for i in range(0, len(batches), accum)]
        )
    return [np.concatenate(parts) for parts in zip(*per_rank, strict=True)]


@pytest.mark.parametrize(("world", "micro"), [(1, 64), (1, 8), (2, 16), (4, 8), (4, 16), (8, 1)])
@pytest.mark.parametrize("n", [1000, 100])
def test_one_step_is_exactly_the_stream_slice(n, world, micro):
    step = 2
    got = _steps(n, 64, micro, world, steps=step + 1, start_step=step)[0]
    assert len(set(got.tolist())) == 64
    np.testing.assert_array_equal(got, _stream(n, step * 64, 64))


def test_same_samples_per_step_for_every_layout():
    n, gb, steps = 200, 64, 10  # 640 positions: crosses three epoch boundaries
    layouts = [(1, 64), (2, 16), (4, 8)]
    runs = [
        [sorted(s.tolist()) for s in _steps(n, gb, micro, world, steps)] for world, micro in layouts
    ]
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert runs[0] == [sorted(_stream(n, s * gb, gb).tolist()) for s in range(steps)]


def test_one_epoch_covers_every_index_once():
    got = np.concatenate(_steps(256, 64, 16, 2, steps=4))
    assert sorted(got.tolist()) == list(range(256))
    assert not np.array_equal(got, np.arange(256))  # shuffled


def test_epoch_boundary_continues_into_next_permutation():
    n = 100  # not a multiple of G=64
    p0, p1, p2 = (epoch_permutation(n, SEED, e) for e in range(3))
    assert not np.array_equal(p0, p1)
    steps = _steps(n, 64, 16, 2, steps=4)  # stream positions 0..255
    np.testing.assert_array_equal(steps[0], p0[:64])
    np.testing.assert_array_equal(steps[1], np.concatenate([p0[64:], p1[:28]]))
    np.testing.assert_array_equal(steps[2], p1[28:92])
    np.testing.assert_array_equal(steps[3], np.concatenate([p1[92:], p2[:56]]))
    stream = np.concatenate(steps)
    assert sorted(stream[:100].tolist()) == list(range(100))
    assert sorted(stream[100:200].tolist()) == list(range(100))


def test_permutation_depends_on_seed_and_epoch_only():
    np.testing.assert_array_equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 2))
    assert not np.array_equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 2, 2))


@pytest.mark.parametrize("start", [0, 1, 3, 5, 7, 8])
@pytest.mark.parametrize(("world", "micro"), [(1, 32), (2, 8), (4, 4)])
def test_resume_yields_the_tail_of_an_uninterrupted_run(start, world, micro):
    n, gb, steps = 100, 32, 8
    accum = gb // world // micro
    for rank in range(world):
        full = list(_sampler(n, gb, micro, world, rank, steps))
        tail = list(_sampler(n, gb, micro, world, rank, steps, start_step=start))
        assert len(tail) == len(full) - start * accum
        for a, b in zip(tail, full[start * accum :], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("gb", "micro", "world", "steps", "start", "want"),
    [(64, 64, 1, 10, 0, 10), (64, 8, 2, 10, 0, 40), (64, 8, 4, 10, 3, 14), (64, 1, 8, 5, 5, 0)],
)
def test_len(gb, micro, world, steps, start, want):
    sampler = _sampler(1000, gb, micro, world, world - 1, steps, start)
    assert len(sampler) == want == len(list(sampler))


@pytest.mark.parametrize(
    ("n", "world", "batch"), [(10, 3, 2), (7, 4, 3), (3, 4, 2), (100, 1, 32), (101, 8, 5)]
)
def test_eval_shards_cover_each_index_once(n, world, batch):
    shards = [eval_shards(n, world, r, batch) for r in range(world)]
    flat = [i for rank in shards for b in rank for i in b.tolist()]
    assert sorted(flat) == list(range(n))
    assert all(0 < len(b) <= batch for rank in shards for b in rank)
    sizes = [sum(len(b) for b in rank) for rank in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("gb", "micro", "world"), [(64, 1, 3), (64, 5, 4), (64, 1, 128), (64, 64, 2), (100, 3, 1)]
)
def test_rejects_splits_that_do_not_divide(gb, micro, world):
    with pytest.raises(ValueError, match=f"global batch {gb} .* {micro} on {world} ranks"):
        _sampler(1000, gb, micro, world, 0, 1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_changed_global_batch_continues_the_stream_at_the_consumed_samples(world):
    """Steps 0-3 with global batch 64 consumed positions [0, 256); with 96 from step 4 on, the
    steps take [256, 352), [352, 448), ... on any world size: nothing skipped or repeated."""
    n, micro = 300, 16 if world != 3 else 32
    for rank in range(world):
        sampler = GlobalBatchSampler(
            n,
            global_batch=96,
            micro_batch=micro,
            world_size=world,
            rank=rank,
            seed=SEED,
            steps=7,
            start_step=4,
            start_position=256,
        )
        per_step = 96 // world // micro
        batches = list(sampler)
        assert len(batches) == 3 * per_step
        for k in range(3):
            mine = np.concatenate(batches[k * per_step : (k + 1) * per_step])
            first = 256 + k * 96 + rank * (96 // world)
            np.testing.assert_array_equal(mine, _stream(n, first, 96 // world))

"""The micro-step timing after training: which sizes, and that the trained model is left as it
was (buffers such as BatchNorm's statistics put back, no gradients left behind)."""

from __future__ import annotations

import pytest
import torch

from launcher.backends.accelerate import AccelerateBackend
from launcher.data.tensors import TensorPairs
from launcher.models.loss import CrossEntropy
from launcher.training.speed import ladder, time_micro_steps
from tests.helpers import composed


def test_ladder_is_powers_of_two_and_the_plans_micro_batch() -> None:
    assert ladder(96, 200) == [2, 4, 8, 16, 32, 64, 96, 128]
    assert ladder(1, 1) == [1]  # the plan's own micro-batch, even below 2


def test_timing_leaves_the_model_as_it_was() -> None:
    backend = AccelerateBackend(composed([]), "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3),
        torch.nn.BatchNorm1d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(152, 10),
    )
    data = TensorPairs(torch.randn(64, 1, 40), torch.randint(10, (64,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = CrossEntropy()
    result = time_micro_steps(model, backend, data, [1, 8, 64], torch.float32, loss, repeats=2)
    seconds = result["micro_step_seconds"]
    assert sorted(seconds) == ["1", "64", "8"] and result["micro_step_out_of_memory_at"] is None
    assert all(t > 0 for t in seconds.values())
    repeats = result["micro_step_repeats"]  # each repeat, the warm-up left out: the median's
    assert sorted(repeats) == sorted(seconds) and all(len(v) == 2 for v in repeats.values())
    assert all(seconds[k] == pytest.approx(sum(v) / 2) for k, v in repeats.items())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running mean/var and num_batches_tracked too
    assert all(p.grad is None for p in model.parameters())

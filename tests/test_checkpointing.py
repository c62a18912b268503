"""Activation checkpointing: the same training, bit for bit, in less memory per sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from launcher.data import DataSpec
from launcher.memory.probe import probe_trace
from launcher.memory.profile import PROBE_SIZES, fit_traces
from launcher.models import build_model
from launcher.planning.plan import PlanInput, plan_batch
from tests.helpers import composed

MODELS = {
    "cnn1d": ([], DataSpec((1, 40), 10)),
    "mlp": (["model=mlp"], DataSpec((1, 40), 10)),
    "resnet18": (
        ["+recipe=resnet50", "model.arch=resnet18", "data=synthetic"],
        DataSpec((3, 16, 16), 10),
    ),
}
ON = "model.activation_checkpointing=true"


def _train(args: list[str], spec: DataSpec) -> dict[str, torch.Tensor]:
    """Three SGD steps in float64 on fixed random data; the final state dict."""
    cfg = composed(args)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, *spec.input_shape, generator=g, dtype=torch.float64)
        y = torch.randint(spec.num_classes, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpointed_training_is_bit_identical_incl_batchnorm_statistics(name):
    """The recomputation is a second forward: BatchNorm's running statistics (and counters) must
    still be updated once per step, as without checkpointing."""
    args, spec = MODELS[name]
    plain, checkpointed = _train(args, spec), _train([*args, ON], spec)
    assert plain.keys() == checkpointed.keys()  # state dicts load either way
    for key, value in plain.items():
        assert torch.equal(checkpointed[key], value), key


def test_checkpointing_lowers_the_measured_bytes_per_sample():
    args, _ = MODELS["resnet18"]
    spec = DataSpec((3, 32, 32), 10)
    per_sample = {}
    for extra in ([], [ON]):
        cfg = composed([*args, "global_batch=256", *extra])
        plan = plan_batch(PlanInput(cfg, 1, 1000))
        n1, n2 = PROBE_SIZES
        t1, t2 = (probe_trace(cfg, spec, plan, "cpu", n) for n in (n1, n2))
        profile = fit_traces(n1, t1, n2, t2, "measured")
        per_sample[bool(extra)] = profile.peak(257) - profile.peak(256)
    assert per_sample[True] < 0.8 * per_sample[False], per_sample  # measured: 300 vs 446 KiB

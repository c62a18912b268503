"""Tests for lr_at: warmup then decay, as a pure function of consumed samples."""

from __future__ import annotations

import functools
import math

import pytest

from launcher.config.compose import compose_run
from launcher.config.schema import RunConfig
from launcher.planning.plan import PlanInput, plan_batch
from launcher.planning.schedule import lr_at
from launcher.types.plan import BatchPlan

IMAGENET = 1_281_167


def _plan(**kw: object) -> BatchPlan:
    """lr 1.0 after 1000 warmup samples from 0.1; the run is 11000 samples (110 steps of 100)."""
    fields: dict[str, object] = dict(
        global_batch=100,
        world_size=1,
        per_device_batch=100,
        micro_batch=100,
        accumulation=1,
        optimizer="sgd",
        lr_rule="linear",
        base_lr=0.1,
        lr=1.0,
        weight_decay=0.0,
        warmup_samples=1000,
        warmup_start_lr=0.1,
        decay="cosine",
        decay_power=2.0,
        milestone_samples=(),
        gamma=0.1,
        end_lr=0.0,
        epoch_samples=1000,
        steps=110,
        total_samples=11000,
    )
    fields.update(kw)
    return BatchPlan(**fields)  # type: ignore[arg-type]


STEP = {"decay": "step", "milestone_samples": (3000, 6000, 8000)}
COS_END = {"end_lr": 0.1}
POLY2 = {"decay": "poly", "decay_power": 2.0}


@pytest.mark.parametrize(
    ("kw", "samples", "want"),
    [
        # warmup: linear from warmup_start_lr to lr over warmup_samples
        ({}, 0, 0.1),
        ({}, 500, 0.55),
        ({}, 999, 0.1 + 0.9 * 0.999),
        ({}, 1000, 1.0),
        ({"warmup_start_lr": 0.0}, 250, 0.25),
        ({"warmup_samples": 0}, 0, 1.0),  # no warmup: peak from the first step
        # cosine (warmup 1000, decay over the remaining 10000 samples)
        ({}, 3500, 0.5 * (1 + math.cos(math.pi / 4))),
        ({}, 6000, 0.5),
        ({}, 11000, 0.0),
        ({}, 12000, 0.0),  # past the end: stays at end_lr
        (COS_END, 6000, 0.55),
        (COS_END, 11000, 0.1),
        # step: x gamma at each milestone (bisect_right: the milestone itself is decayed)
        (STEP, 2999, 1.0),
        (STEP, 3000, 0.1),
        (STEP, 5999, 0.1),
        (STEP, 6000, 0.01),
        (STEP, 7999, 0.01),
        (STEP, 8000, 0.001),
        (STEP, 11000, 0.001),
        # poly
        (POLY2, 6000, 0.25),
        (POLY2, 3500, 0.5625),
        (POLY2, 11000, 0.0),
        ({"decay": "poly", "decay_power": 1.0}, 6000, 0.5),
        ({**POLY2, "end_lr": 0.2}, 6000, 0.2 + 0.8 * 0.25),
        # constant
        ({"decay": "constant"}, 1000, 1.0),
        ({"decay": "constant"}, 10999, 1.0),
        ({"decay": "constant"}, 500, 0.55),  # still warms up
    ],
)
def test_lr_at(kw, samples, want):
    assert lr_at(_plan(**kw), samples) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_unknown_decay_raises():
    with pytest.raises(ValueError, match="bogus"):
        lr_at(_plan(decay="bogus"), 5000)


# ---------------------------------------------- invariance to world size / micro / accumulation
@functools.cache
def _cfg(*overrides: str) -> RunConfig:
    return compose_run(["+recipe=resnet50", *overrides])


LAYOUTS = [(256, ()), (8, ()), (8, ("micro_batch=64",)), (1, ()), (2, ("micro_batch=8",))]


@pytest.mark.parametrize(
    "overrides",
    [
        ("global_batch=8192",),  # step decay, warmup from ref
        ("global_batch=8192", "schedule=cosine"),
        ("global_batch=8192", "schedule=poly"),  # warmup from zero
        ("global_batch=16384",),  # swapped to LARS: poly 2, 12-epoch warmup
    ],
)
def test_lr_depends_only_on_consumed_samples(overrides):
    plans = [
        plan_batch(PlanInput(_cfg(*overrides, *extra), world, IMAGENET)) for world, extra in LAYOUTS
    ]
    layouts = {(p.world_size, p.micro_batch, p.accumulation) for p in plans}
    assert len(layouts) == len(LAYOUTS)  # the layouts really differ
    ref = plans[0]
    points = sorted(
        {0, 1, ref.warmup_samples // 2, ref.warmup_samples - 1, ref.warmup_samples}
        | {m + d for m in ref.milestone_samples for d in (-1, 0)}
        | {ref.total_samples // 3, ref.total_samples - ref.global_batch, ref.total_samples}
        | {s * ref.global_batch for s in range(0, ref.steps, 997)}
    )
    curve = [lr_at(ref, s) for s in points]
    assert len(set(curve)) > 3  # the schedule actually moves over these points
    for plan in plans[1:]:
        assert [lr_at(plan, s) for s in points] == curve

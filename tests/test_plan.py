"""Tests for the batch plan: split, LR scaling, optimizer swap, warmup, steps and the table."""

from __future__ import annotations

import functools
import re

import pytest

from launcher.config.compose import compose_run
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError
from launcher.planning.plan import PlanInput, plan_batch
from launcher.planning.render import format_plan
from launcher.planning.rules import choose_optimizer, scale_lr
from launcher.planning.split import split_batch

IMAGENET = 1_281_167  # ImageNet-1k training images


@functools.cache
def _cfg(*overrides: str) -> RunConfig:
    return compose_run(list(overrides))


def _resnet(*overrides: str) -> RunConfig:
    return _cfg("+recipe=resnet50", *overrides)


# ------------------------------------------------------------------------------ split_batch
@pytest.mark.parametrize(
    ("gb", "world", "micro", "max_micro", "cap", "want_micro", "want_accum", "why"),
    [
        (8192, 256, "auto", 256, None, 32, 1, "max_micro_batch"),  # Goyal et al.
        (8192, 8, "auto", 256, None, 256, 4, "max_micro_batch"),
        (8192, 8, "auto", 256, 128, 128, 8, "(memory)"),  # memory cap below max wins
        (8192, 8, "auto", 64, 128, 64, 16, "max_micro_batch"),  # max below memory cap wins
        (96, 1, "auto", 1024, 64, 48, 2, "largest divisor of 96"),
        (192, 2, "auto", 64, None, 48, 2, "largest divisor of 96"),
        (97, 1, "auto", 64, None, 1, 97, "largest divisor of 97"),  # prime: micro 1
        (512, 1, "auto", 1024, None, 512, 1, "max_micro_batch"),
        (512, 4, 32, 1024, None, 32, 4, "micro_batch=32"),
        (512, 4, 128, 128, 128, 128, 1, "micro_batch=128"),  # explicit micro equal to the cap
    ],
)
def test_split_batch(gb, world, micro, max_micro, cap, want_micro, want_accum, why):
    got_micro, accum, reasons = split_batch(gb, world, micro, max_micro, cap)
    assert (got_micro, accum) == (want_micro, want_accum)
    assert got_micro * accum * world == gb
    assert why in reasons["micro_batch"]
    assert f"{accum} = {gb} / ({got_micro} micro x {world} devices)" == reasons["accumulation"]


@pytest.mark.parametrize(
    ("gb", "world", "micro", "max_micro", "cap", "needles"),
    [
        (1000, 3, "auto", 1024, None, ["global_batch=1000", "3", "999", "1002"]),
        (1000, 16, "auto", 1024, None, ["global_batch=1000", "16", "remainder 8", "992", "1008"]),
        (4, 8, "auto", 1024, None, ["global_batch=4", "world size 8", "global_batch >= 8"]),
        (512, 4, 24, 64, None, ["micro_batch=24", "128", "1, 2, 4, 8, 16, 32, 64;", "480", "576"]),
        (512, 4, 128, 64, None, ["micro_batch=128", "cap 64", "max_micro_batch", "<= 64"]),
        (512, 4, 128, 1024, 32, ["micro_batch=128", "cap 32", "(memory)", "<= 32"]),
    ],
)
def test_split_batch_errors(gb, world, micro, max_micro, cap, needles):
    with pytest.raises(ConfigError) as err:
        split_batch(gb, world, micro, max_micro, cap)
    msg = str(err.value)
    assert "\n" not in msg
    assert [n for n in needles if n not in msg] == [], msg


def test_split_batch_valid_1000_on_8():
    assert split_batch(1000, 8, "auto", 1024)[:2] == (125, 1)


# ------------------------------------------------------------------------------------- Goyal
def test_goyal_resnet50_8192_on_256():
    plan = plan_batch(PlanInput(_resnet("global_batch=8192"), 256, IMAGENET))
    assert (plan.per_device_batch, plan.micro_batch, plan.accumulation) == (32, 32, 1)
    assert plan.lr == pytest.approx(3.2) and plan.lr_rule == "linear"
    assert plan.optimizer == "sgd" and plan.decay == "step"
    assert plan.warmup_samples == 5 * IMAGENET and plan.warmup_start_lr == 0.1
    assert plan.milestone_samples == (30 * IMAGENET, 60 * IMAGENET, 80 * IMAGENET)
    assert "0.1 x 8192/256" in plan.reasons["lr"]


# ------------------------------------------------------------------------------------ scale_lr
@pytest.mark.parametrize(
    ("overrides", "gb", "lr", "rule", "needles"),
    [
        ((), 512, 0.48, "linear", ["0.48 = 0.03 x 512/32", "linear", "auto picks linear"]),
        (("optim=adamw",), 512, 0.12, "sqrt", ["0.12 = 0.03 x sqrt(512/32)", "auto picks sqrt"]),
        (("optim=adam",), 128, 0.06, "sqrt", ["0.06 = 0.03 x sqrt(128/32)"]),
        (("optim.scaling=sqrt",), 288, 0.09, "sqrt", ["0.09 = 0.03 x sqrt(288/32)"]),
        (("optim=adamw", "optim.scaling=linear"), 64, 0.06, "linear", ["0.03 x 64/32"]),
        (("optim.scaling=none",), 512, 0.03, "none", ["0.03, not scaled (optim.scaling=none)"]),
    ],
)
def test_scale_lr(overrides, gb, lr, rule, needles):
    got, got_rule, why = scale_lr(_cfg(*overrides).optim, gb)
    assert got == pytest.approx(lr) and got_rule == rule
    assert all(n in why for n in needles), why
    assert ("auto picks" in why) == ("optim.scaling" not in " ".join(overrides))


# -------------------------------------------------------------------------- large-batch swap
@pytest.mark.parametrize(
    ("overrides", "optimizer", "decay", "power", "warmup_epochs"),
    [
        (("global_batch=16384",), "lars", "poly", 2.0, 12),
        (("global_batch=16384", "optim=adamw"), "lamb", "poly", 1.0, 12),
        (("global_batch=16384", "optim=adam"), "lamb", "poly", 1.0, 12),
        (("global_batch=8192",), "sgd", "step", 2.0, 5),  # exactly at the threshold: no swap
        (("global_batch=16384", "optim.large_batch.enabled=false"), "sgd", "step", 2.0, 5),
        (("global_batch=16384", "optim=lars"), "lars", "step", 2.0, 5),  # already large-batch
        (("global_batch=16384", "optim=lamb"), "lamb", "step", 2.0, 5),
        (("global_batch=8193", "optim.large_batch.warmup_epochs=3"), "lars", "poly", 2.0, 3),
    ],
)
def test_large_batch_swap(overrides, optimizer, decay, power, warmup_epochs):
    cfg = _resnet(*overrides)
    plan = plan_batch(PlanInput(cfg, 1, IMAGENET))
    assert (plan.optimizer, plan.decay, plan.decay_power) == (optimizer, decay, power)
    assert plan.warmup_samples == warmup_epochs * IMAGENET
    assert (plan.milestone_samples != ()) == (decay == "step")
    name, swapped, why = choose_optimizer(cfg.optim, cfg.global_batch)
    assert (name, swapped) == (optimizer, optimizer != cfg.optim.name)
    if swapped:
        assert f"{cfg.global_batch} > optim.large_batch.threshold 8192" in why
        assert f"{optimizer} policy" in plan.reasons["decay"]


# ------------------------------------------------------------------------------------ warmup
@pytest.mark.parametrize(
    ("overrides", "warmup_epochs", "start", "needle"),
    [
        (("global_batch=256",), 0, 0.1, "not above the reference lr"),
        (("global_batch=8192", "optim.scaling=none"), 0, 0.1, "not above the reference lr"),
        (("global_batch=8192", "schedule.warmup_epochs=0"), 0, 0.1, "warmup_epochs=0"),
        (("global_batch=8192",), 5, 0.1, "linear from 0.1 to 3.2"),
        (("global_batch=8192", "schedule.warmup_from=zero"), 5, 0.0, "linear from 0 to 3.2"),
        (("global_batch=256", "schedule.warmup_from=zero"), 5, 0.0, "linear from 0 to 0.1"),
        (("global_batch=8192", "schedule.warmup_epochs=2.5"), 2.5, 0.1, "2.5 epochs"),
    ],
)
def test_warmup(overrides, warmup_epochs, start, needle):
    plan = plan_batch(PlanInput(_resnet(*overrides), 8, IMAGENET))
    assert plan.warmup_samples == round(warmup_epochs * IMAGENET)
    assert plan.warmup_start_lr == start
    assert needle in plan.reasons["warmup_samples"]


@pytest.mark.parametrize(
    ("epochs", "note"),
    [
        (20, None),  # 5 of 20 epochs: a quarter of the run
        (10, None),  # half the run exactly: no note
        (9.9, "(most of the run: 156.2 of its 310 steps train below the peak lr;"),
        (5, "(most of the run: 156.2 of its 157 steps train below the peak lr;"),  # issue 30
        (4, "(longer than the run: the peak lr is never reached)"),
    ],
)
def test_a_warmup_over_most_of_the_run_gets_a_note(epochs, note):
    """mnist1d at 1,024 (LAMB, 5 warmup epochs of 32,000 samples): a warmup longer than half
    of the run's steps says so; one longer than the run says that instead."""
    plan = plan_batch(PlanInput(_cfg("global_batch=1024", f"trainer.epochs={epochs}"), 1, 32000))
    why = plan.reasons["warmup_samples"]
    assert plan.warmup_samples == 160000
    if note is None:
        assert "most of the run" not in why and "longer than the run" not in why
    else:
        assert note in why


# ---------------------------------------------------------------------------- steps / samples
@pytest.mark.parametrize(
    ("overrides", "n", "steps", "overflow"),
    [
        (("+recipe=resnet50", "global_batch=8192"), IMAGENET, 14076, "5,562"),
        (("global_batch=512",), 32000, 1250, None),  # mnist1d: 20 x 32000 / 512, exact
        (("global_batch=300", "trainer.epochs=0.5"), 1000, 2, "100"),
        (("global_batch=64", "trainer.epochs=1"), 100, 2, "28"),
        (("global_batch=5000", "trainer.epochs=1.1"), 50000, 11, None),  # 55000 / 5000, exact
    ],
)
def test_steps_and_total_samples(overrides, n, steps, overflow):
    cfg = _cfg(*overrides)
    plan = plan_batch(PlanInput(cfg, 1, n))
    gb, why = cfg.global_batch, plan.reasons["steps"]
    assert plan.steps == steps, why
    assert plan.total_samples == plan.steps * gb
    exact = round(cfg.trainer.epochs * n)
    assert (plan.steps - 1) * gb < exact <= plan.total_samples
    if overflow is None:
        assert "next epoch" not in why
    else:
        assert f"runs {overflow} samples into the next epoch" in why


def test_empty_training_split_raises():
    with pytest.raises(ConfigError, match="empty"):
        plan_batch(PlanInput(_cfg(), 1, 0))


# -------------------------------------------------------------------------------- format_plan


def test_format_plan_lists_every_row_with_its_reason():
    plan = plan_batch(PlanInput(_resnet("global_batch=8192"), 256, IMAGENET))
    text = format_plan(plan)
    firsts = [line.split()[0] for line in text.splitlines() if line.strip()]
    for row in ("per_device_batch", "micro_batch", "accumulation", "optimizer", "warmup_samples"):
        assert row in firsts
    assert plan.reasons["lr"] in text and plan.reasons["steps"] in text
    lr_line = next(line for line in text.splitlines() if line.split()[0] == "lr")
    assert lr_line.split()[1] == "3.2"
    assert "6,405,835" in text and "14,076" in text


def test_mnist1d_recipe_swaps_to_lamb_with_its_own_lr_and_decay():
    """Above 512 the mnist1d recipe swaps SGD for LAMB: own base LR, sqrt rule, own weight decay."""
    plan = plan_batch(PlanInput(_cfg("global_batch=2048"), 1, 32000))
    assert plan.optimizer == "lamb" and plan.lr_rule == "sqrt"
    assert plan.lr == pytest.approx(0.00625 * 8)  # sqrt(2048 / 32) = 8
    assert plan.weight_decay == 0.01 and plan.decay == "poly" and plan.decay_power == 1.0
    assert plan.warmup_start_lr == 0.00625 and plan.warmup_samples == 5 * 32000
    assert "optim.large_batch.base_lr" in plan.reasons["lr"]
    assert "optim.large_batch.weight_decay" in plan.reasons["weight_decay"]
    at_threshold = plan_batch(PlanInput(_cfg("global_batch=512"), 1, 32000))
    assert (at_threshold.optimizer, at_threshold.lr, at_threshold.weight_decay) == (
        "sgd",
        0.48,
        0.0,
    )


def test_swapped_optimizer_is_built_with_the_plans_weight_decay():
    from torch import nn

    from launcher.optim import build_optimizer
    from launcher.optim.lamb import LAMB

    cfg = _cfg("global_batch=2048")
    plan = plan_batch(PlanInput(cfg, 1, 32000))
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    assert isinstance(opt, LAMB)
    decay, plain = opt.param_groups
    assert (decay["weight_decay"], decay["adapt"], len(decay["params"])) == (0.01, True, 1)
    assert (plain["weight_decay"], plain["adapt"], len(plain["params"])) == (0.0, False, 3)
    assert decay["eps"] == 1e-6 and decay["lr"] == pytest.approx(0.05)


def test_the_robust_policy_shows_in_the_plan() -> None:
    """The mnist1d recipe's policy (issue 18): clipping at 1.0, the linear rule with warmup up to
    512, LAMB above; unclipped at 8x the reference or more, the plan says what was measured."""
    default = plan_batch(
        PlanInput(compose_run(["+recipe=mnist1d", "memory.probe=false"]), 1, 32000)
    )
    assert (default.clip_grad_norm, default.optimizer, default.lr) == (1.0, "sgd", 0.48)
    row = re.compile(r"^clip_grad_norm +1  the global gradient norm is clipped to 1", re.M)
    assert row.search(format_plan(default))
    big = plan_batch(PlanInput(compose_run(["global_batch=2048", "memory.probe=false"]), 1, 32000))
    assert big.optimizer == "lamb" and big.clip_grad_norm == 1.0
    off = compose_run(["optim.clip_grad_norm=0", "memory.probe=false"])
    why = plan_batch(PlanInput(off, 1, 32000)).reasons["clip_grad_norm"]
    assert why.startswith("off (optim.clip_grad_norm=0); the batch is 16x optim.ref_batch")
    small = compose_run(["optim.clip_grad_norm=0", "global_batch=128", "memory.probe=false"])
    assert (
        plan_batch(PlanInput(small, 1, 32000)).reasons["clip_grad_norm"]
        == "off (optim.clip_grad_norm=0)"
    )

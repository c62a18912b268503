"""Batch ramp-up: stages in samples, exact sample accounting, LR coupled by the scaling rule, the
sample stream across stage changes, resume mid-ramp on another world size, bad input.

Stated tolerance: the interrupted run resumed on 2 ranks ends within 1e-10 (float64) of the
uninterrupted one-rank run (only the summation order of the gradient reduction differs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launcher.cli import main
from launcher.config.compose import compose_run
from launcher.data.sampler import GlobalBatchSampler, epoch_permutation
from launcher.planning.plan import PlanInput, plan_batch
from launcher.planning.schedule import lr_at
from tests.helpers import PARITY_ARGS, final_state, read_metrics, run_cli, train_here

RAMP = ["global_batch=512", "ramp.start_batch=64", "ramp.samples=48000", "trainer.epochs=3"]


def _plan(overrides: list[str], world: int = 1, epoch: int = 32000):
    return plan_batch(PlanInput(compose_run(["memory.probe=false", *overrides]), world, epoch))


def test_stages_double_the_batch_and_account_for_every_sample() -> None:
    plan = _plan(RAMP)
    # 48,000 / 3 stages = 16,000 samples each: 250 x 64, then 125 x 128 (32,000), then
    # ceil(16,000 / 256) = 63 x 256 (48,128: the step that crosses the boundary runs whole)
    assert [(s.global_batch, s.origin_step, s.steps) for s in plan.ramp] == [
        (64, 0, 250),
        (128, 250, 375),
        (256, 375, 438),
    ]
    assert (plan.origin_step, plan.origin_samples) == (438, 48128)
    assert plan.steps == 438 + -(-(96000 - 48128) // 512)  # ceil
    for step in range(plan.steps):  # exact accounting, step by step
        assert plan.samples_at(step + 1) - plan.samples_at(step) == plan.at(step).global_batch
    assert plan.samples_at(plan.steps) == plan.total_samples >= 96000
    assert plan.total_samples - 96000 < 512
    assert plan.reasons["ramp"].startswith("64 (micro 64 x 1, lr 0.06) for steps 0-249; 128")


def test_each_stage_scales_the_plans_lr_curve_by_the_rule() -> None:
    plan = _plan(RAMP)  # SGD, linear rule: lr(b) / lr(512) = b / 512
    for stage in plan.ramp:
        k = stage.global_batch / 512
        assert stage.lr == pytest.approx(plan.lr * k, rel=1e-12)
        assert stage.optimizer == plan.optimizer and stage.total_samples == plan.total_samples
        for samples in (0, 7_000, 30_000, 90_000):
            assert lr_at(stage, samples) == pytest.approx(k * lr_at(plan, samples), rel=1e-12)
    sqrt = _plan([*RAMP, "optim=adamw", "optim.base_lr=0.001", "optim.large_batch.enabled=false"])
    assert sqrt.ramp[0].lr == pytest.approx(sqrt.lr * (64 / 512) ** 0.5, rel=1e-12)


def test_stages_keep_the_micro_batch_at_the_cap_and_recompute_accumulation() -> None:
    plan = _plan([*RAMP, "max_micro_batch=32", "trainer.noise_scale=false"], world=2)
    assert [(s.per_device_batch, s.micro_batch, s.accumulation) for s in plan.ramp] == [
        (32, 32, 1),
        (64, 32, 2),
        (128, 32, 4),
    ]
    assert (plan.per_device_batch, plan.micro_batch, plan.accumulation) == (256, 32, 8)


def test_the_sample_stream_runs_on_across_stages_on_two_ranks() -> None:
    """Each stage's sampler starts where the previous stage stopped: the ranks' micro-batches
    of every step are exactly the next global-batch slice of the shuffled stream."""
    n = 1000
    ramp = ["global_batch=256", "ramp.start_batch=32", "ramp.samples=600", "max_micro_batch=16"]
    plan = _plan([*ramp, "trainer.epochs=1.5"], world=2, epoch=n)
    stream = np.concatenate([epoch_permutation(n, 0, e) for e in range(3)])
    step = 0
    while step < plan.steps:
        stage = plan.at(step)
        ranks = [
            iter(
                GlobalBatchSampler(
                    n,
                    global_batch=stage.global_batch,
                    micro_batch=stage.micro_batch,
                    world_size=2,
                    rank=r,
                    seed=0,
                    steps=stage.steps,
                    start_step=step,
                    start_position=stage.samples_at(step),
                )
            )
            for r in range(2)
        ]
        for s in range(step, stage.steps):
            got = np.concatenate(
                [np.concatenate([next(it) for _ in range(stage.accumulation)]) for it in ranks]
            )
            first = plan.samples_at(s)
            assert np.array_equal(got, stream[first : first + stage.global_batch]), s
        step = stage.steps
    assert [(s.global_batch, s.steps) for s in plan.ramp] == [(32, 7), (64, 10), (128, 12)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ramp.start_batch=96"], "ramp.start_batch=96: global_batch 512 must be start_batch x a "),
        (["ramp.start_batch=512"], "nearest valid: 128 or 256"),
        (["ramp.start_batch=64", "ramp.samples=0"], "ramp.samples=0: must be > 0 when"),
        (["ramp.start_batch=64", "ramp.samples=900000"], "the ramp-up must end before the run"),
        (["ramp.start_batch=64", "backend=deepspeed"], "backend=accelerate only so far"),
        (["ramp.start_batch=64", "micro_batch=128"], "the stage at global batch 64: micro_batch"),
    ],
)
def test_bad_ramp_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["global_batch=512", "ramp.samples=48000", "plan_only=true", "memory.probe=false"]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


# 1,600 samples x 0.5 epochs = 800: batch 16 for 10 steps, 32 for 5 (320 samples), then 64
RUN = [
    *PARITY_ARGS,
    "trainer.epochs=0.5",
    "ramp.start_batch=16",
    "ramp.samples=320",
    "memory.probe=false",
    "checkpoint.every_samples=64",
    "run_dir=run",
]


@pytest.mark.slow
def test_a_ramp_run_resumed_mid_ramp_on_two_ranks_matches_the_whole_run(tmp_path, data_cache):
    cmd = [*RUN, f"data.cache_dir={data_cache}"]
    whole = tmp_path / "whole"
    whole.mkdir()
    res = train_here(cmd, whole)  # in this process; the kill and the 2 ranks are processes
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads((whole / "run" / "plan.json").read_text())
    assert [(s["global_batch"], s["steps"]) for s in plan["ramp"]] == [(16, 10), (32, 15)]
    assert plan["steps"] == 15 + 8
    records = read_metrics(whole / "run")
    ramps = [(r["step"], r["global_batch"]) for r in records if r.get("event") == "ramp"]
    assert ramps == [(10, 32), (15, 64)]
    logged = {r["step"]: (r["samples"], r["global_batch"]) for r in records if "loss" in r}
    expected = [(16 * s, 16) for s in range(1, 11)] + [(160 + 32 * s, 32) for s in range(1, 6)]
    expected += [(320 + 64 * s, 64) for s in range(1, 9)]
    assert [logged[s] for s in range(1, 24)] == expected

    res = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": "13:step"})  # in the 32 stage
    assert res.returncode == -9, res.stderr[-2000:]
    res = run_cli([*cmd, "trainer.devices=2"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # saves after the steps crossing each 64 samples: 4, 8, 11 (192), 13 (256); killed before 13's
    assert "resuming from" in res.stdout and "step 11 of 23" in res.stdout
    ref, got = final_state(whole / "run"), final_state(tmp_path / "run")
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-10, rtol=0, msg=name)

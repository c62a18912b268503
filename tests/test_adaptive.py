"""The adaptive batch ramp (launcher/planning/adaptive.py): its decision rule, the plans of its
stages (exact sample accounting across changes, LR by the scaling rule), bad input, and real runs
whose decisions survive a kill and a resume exactly (same world size: bit-identical; two ranks:
within 1e-10 in float64, only the reduction order differs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launcher.cli import main
from launcher.config.compose import compose_run
from launcher.planning.adaptive import decide, stage_plan
from launcher.planning.plan import PlanInput, _plan, plan_batch
from launcher.planning.schedule import lr_at
from launcher.types.plan import AdaptiveStage
from tests.helpers import PARITY_ARGS, final_state, read_metrics, run_cli, train_here

ADAPTIVE = ["global_batch=2048", "ramp.mode=adaptive", "ramp.start_batch=32"]


def _cfg(extra: list[str] = ()):
    return compose_run(["memory.probe=false", *ADAPTIVE, *extra])


@pytest.mark.parametrize(
    ("batch", "noise", "steps", "want"),
    [
        (32, 70.0, 100, 64),  # the largest doubling <= 70
        (32, 300.0, 100, 256),  # several doublings at once
        (32, 1e9, 100, 2048),  # capped at global_batch
        (32, 63.9, 100, None),  # 64 > 63.9
        (32, 1e9, 99, None),  # fewer than min_steps at this batch
        (32, None, 100, None),  # no estimate yet
        (32, math.nan, 100, None),
        (2048, 1e9, 100, None),  # at the cap
    ],
)
def test_decide(batch, noise, steps, want) -> None:
    assert decide(batch, 2048, noise, steps, 100, 1.0) == want


def test_noise_factor_trades_samples_for_steps() -> None:
    assert decide(32, 2048, 300.0, 100, 100, 0.25) == 1024  # 300 / 0.25 = 1200
    assert decide(32, 2048, 300.0, 100, 100, 2.0) == 128  # 300 / 2 = 150


def test_the_run_starts_small_with_the_caps_optimizer_and_the_rules_lr() -> None:
    cfg = _cfg()
    plan = plan_batch(PlanInput(cfg, 1, 32000))
    steady = _plan(PlanInput(cfg, 1, 32000), (0, 0))  # the plan at the cap, 2048
    assert (plan.global_batch, plan.adaptive_cap, plan.optimizer) == (32, 2048, "lamb")
    assert plan.lr == pytest.approx(steady.lr * math.sqrt(32 / 2048))  # LAMB: square-root rule
    assert plan.steps == 20 * 32000 // 32 and plan.total_samples == steady.total_samples
    for samples in (0, 80000, 320000, 600000):  # the cap's LR curve x the rule's ratio
        want = lr_at(steady, samples) * math.sqrt(32 / 2048)
        assert lr_at(plan, samples) == pytest.approx(want, rel=1e-12)
    assert "adaptive from 32 up to 2048" in plan.reasons["ramp"]


def test_a_later_stage_counts_every_earlier_sample() -> None:
    cfg = _cfg()
    steady = _plan(PlanInput(cfg, 2, 32000), (0, 0))
    grown = ((0, 0, 32), (100, 3200, 64), (220, 10880, 256))  # 32 x 100, 64 x 120 steps
    stage = stage_plan(cfg, steady, AdaptiveStage(1024, 300, 31360, grown), None)  # 256 x 80 steps
    assert [stage.samples_at(s) for s in (0, 50, 100, 150, 220, 260, 300, 301)] == [
        0,
        1600,
        3200,
        6400,
        10880,
        21120,
        31360,
        32384,
    ]
    assert stage.steps == 300 + math.ceil((640000 - 31360) / 1024)
    assert stage.total_samples == steady.total_samples  # the LR curve's span: the cap's
    assert (stage.per_device_batch, stage.micro_batch, stage.accumulation) == (512, 512, 1)
    assert stage.step_reaching(10880) == 220 and stage.step_reaching(10881) == 221


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ramp.samples=1000"], "ramp.samples=1000: applies to ramp.mode=fixed only"),
        (["ramp.start_batch=null"], "ramp.mode='adaptive': adaptive needs ramp.start_batch"),
        (["ramp.start_batch=48"], "global_batch 2048 must be start_batch x a power of two"),
        (["trainer.noise_scale=false"], "needs trainer.noise_scale=true"),
        (["ramp.min_steps=0"], "ramp.min_steps=0: must be > 0"),
        (["ramp.noise_factor=0"], "ramp.noise_factor=0"),
        (["ramp.start_batch=2"], "start from a larger batch"),
    ],
)
def test_bad_adaptive_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*ADAPTIVE, "plan_only=true", "memory.probe=false", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


# 1,600 samples x 1 epoch from batch 16, measured every step, growing to the cap 64 as soon as
# 4 steps ran at 16 and an estimate exists (noise_factor 1e-6: any estimate asks for the cap)
RUN = [
    *PARITY_ARGS,
    "trainer.epochs=1",
    "global_batch=64",
    "ramp.mode=adaptive",
    "ramp.start_batch=16",
    "ramp.min_steps=4",
    "ramp.noise_factor=1e-6",
    "trainer.noise_split_every=1",
    "memory.probe=false",
    "checkpoint.every_samples=64",
    "run_dir=run",
]


@pytest.mark.slow
def test_decisions_survive_a_kill_and_a_resume_exactly(tmp_path, data_cache) -> None:
    """The kills and the run on two ranks are processes; the others run in this one."""
    cmd = [*RUN, f"data.cache_dir={data_cache}"]
    whole = tmp_path / "whole"
    whole.mkdir()
    res = train_here(cmd, whole)
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(whole / "run")
    events = [r for r in records if r.get("event") == "ramp"]
    assert len(events) == 1 and (events[0]["was"], events[0]["global_batch"]) == (16, 64)
    grew = events[0]["step"]
    assert grew >= 4 and "launcher: ramp: global batch 16 -> 64" in res.stdout
    logged = {r["step"]: r["samples"] for r in records if "loss" in r}
    steps = max(logged)
    assert steps == grew + math.ceil((1600 - 16 * grew) / 64)
    want = {s: 16 * s if s <= grew else 16 * grew + 64 * (s - grew) for s in range(1, steps + 1)}
    assert logged == want  # every sample counted, in order, across the change
    plan = json.loads((whole / "run" / "plan.json").read_text())  # rewritten at the change
    assert (plan["global_batch"], plan["origin_step"], plan["grown"]) == (64, grew, [[0, 0, 16]])

    same = tmp_path / "same"
    same.mkdir()
    res = run_cli(cmd, same, env={"LAUNCHER_TEST_KILL": f"{grew + 2}:step"})
    assert res.returncode == -9, res.stderr[-2000:]
    res = train_here(cmd, same)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {same / 'run' / 'checkpoints'}" in res.stdout or "resuming" in res.stdout
    assert "launcher: ramp:" not in res.stdout  # the decision was made before the checkpoint
    ref, got = final_state(whole / "run"), final_state(same / "run")
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)

    res = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": f"{grew + 2}:step"})
    assert res.returncode == -9, res.stderr[-2000:]
    res = run_cli([*cmd, "trainer.devices=2"], tmp_path)  # resumed on two ranks
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"step {grew + 1} of {steps}" in res.stdout
    got = final_state(tmp_path / "run")
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-10, rtol=0, msg=name)

"""How often a process makes a job's config concrete and plans it (launcher/training/job_plan.py
says which plans and why): once each, plus only the re-plans a new fact asks for. Counted in
this process over launcher.run() and the command line's main(), fast tier."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import launcher
from launcher.cli import main
from launcher.planning.plan import plan_batch
from launcher.planning.tokens import in_samples
from tests.helpers import SMALL_DATA

QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.noise_scale=false"]
SMALL = [*SMALL_DATA, *QUIET, "global_batch=64", "trainer.epochs=0.2"]  # 5 steps of 64


@pytest.fixture
def counted(tmp_path, monkeypatch, data_cache):
    """Run in tmp_path; returns (calls, args): plan_batch calls ("plans") and conversions of a
    config into samples ("concrete": launcher/training/job.py concrete), and the arguments
    every run takes (caches in tmp_path)."""
    monkeypatch.chdir(tmp_path)
    calls: Counter[str] = Counter()

    def plans(given):
        calls["plans"] += 1
        return plan_batch(given)

    def converts(cfg, step=(1, "")):
        calls["concrete"] += 1
        return in_samples(cfg, step)

    monkeypatch.setattr("launcher.training.job_plan.plan_batch", plans)
    monkeypatch.setattr("launcher.training.job.in_samples", converts)
    args = [f"data.cache_dir={data_cache}", f"memory.cache_dir={tmp_path / 'memory'}"]
    return calls, args


def test_plan_only_plans_validate_s_plan_and_the_one_with_the_estimated_memory(counted):
    """launcher.run() under plan_only: validate's plan is handed down (the same facts as
    plan_only's first: the declared epoch), then one plan with the estimated memory; without the
    probe, validate's plan is the plan."""
    calls, args = counted
    launcher.run([*SMALL, *args, "plan_only=true", "run_dir=probed"])
    assert calls == {"concrete": 1, "plans": 2}
    assert "estimated" in json.loads(Path("probed/plan.json").read_text())["memory"]["reason"]
    calls.clear()
    launcher.run([*SMALL, *args, "plan_only=true", "memory.probe=false", "run_dir=fixed"])
    assert calls == {"concrete": 1, "plans": 1}


def test_the_command_line_s_hydra_job_plans_its_own_config(counted, capsys):
    """python -m launcher plan_only=true: the launching process checks the job (validate: its
    concrete config, a plan), then Hydra's job, here in the same process under the basic
    launcher, makes the config Hydra composed concrete and plans it, with the estimate."""
    calls, args = counted
    assert main([*SMALL, *args, "plan_only=true", "run_dir=cli"]) == 0
    assert calls == {"concrete": 2, "plans": 3}
    capsys.readouterr()


def test_training_plans_the_counted_data_the_memory_and_a_moved_origin_only(counted):
    """A fresh run on one process: validate (the declared epoch), set_up (the epoch counted in
    the built data), prepare (the measured memory). Resumed at the same global batch the
    checkpoint moves nothing: no re-plan; resumed at another one (allowed), the origin moves:
    one."""
    calls, args = counted
    budget = ["memory.budget_gb=2"]  # the probe's budget, not this machine's free memory
    launcher.run([*SMALL, *args, *budget, "run_dir=probed"])
    assert calls == {"concrete": 1, "plans": 3}

    fixed = [*SMALL, *args, "memory.probe=false", "checkpoint.every_samples=64", "run_dir=run"]
    calls.clear()
    launcher.run([*fixed, "trainer.stop_after_samples=128"])  # stops after step 2, saved there
    assert calls == {"concrete": 1, "plans": 2}
    calls.clear()
    launcher.run([*fixed, "trainer.stop_after_samples=192"])  # resumes at step 2: same facts
    assert calls == {"concrete": 1, "plans": 2}
    calls.clear()
    changed = ["global_batch=32", "checkpoint.allow_global_batch_change=true"]
    result = launcher.run([*fixed, *changed])
    assert calls == {"concrete": 1, "plans": 3}
    plan = json.loads(Path(result["run_dir"], "plan.json").read_text())
    assert (plan["global_batch"], plan["origin_step"], plan["origin_samples"]) == (32, 3, 192)

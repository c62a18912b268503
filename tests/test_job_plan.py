"""How often a process composes a job's config (Hydra), makes it concrete and plans it
(launcher/training/job_plan.py says which plans and why): once each, plus only the re-plans a new
fact asks for. Counted in this process over launcher.run() and the command line's main(), fast
tier."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl

import launcher
from launcher.cli import main
from launcher.planning.plan import plan_batch
from launcher.planning.tokens import in_samples
from tests.helpers import SMALL_DATA

QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.noise_scale=false"]
SMALL = [*SMALL_DATA, *QUIET, "global_batch=64", "trainer.epochs=0.2"]  # 5 steps of 64


@pytest.fixture
def counted(tmp_path, monkeypatch, data_cache):
    """Run in tmp_path; returns (calls, args): Hydra's compositions ("composed": its config
    loader composing, for the launcher's check or Hydra's run; launcher/config/hydra_internals.py
    composing_once), plan_batch calls ("plans") and conversions of a config into samples
    ("concrete": launcher/training/job.py concrete), and the arguments every run takes (caches in
    tmp_path)."""
    monkeypatch.chdir(tmp_path)
    calls: Counter[str] = Counter()
    compose = ConfigLoaderImpl._load_configuration_impl

    def composes(self, *args, **kwargs):
        calls["composed"] += 1
        return compose(self, *args, **kwargs)

    def plans(given):
        calls["plans"] += 1
        return plan_batch(given)

    def converts(cfg, step=(1, "")):
        calls["concrete"] += 1
        return in_samples(cfg, step)

    monkeypatch.setattr("launcher.training.job_plan.plan_batch", plans)
    monkeypatch.setattr("launcher.training.job.in_samples", converts)
    monkeypatch.setattr(ConfigLoaderImpl, "_load_configuration_impl", composes)
    args = [f"data.cache_dir={data_cache}", f"memory.cache_dir={tmp_path / 'memory'}"]
    return calls, args


def test_plan_only_plans_validate_s_plan_and_the_one_with_the_estimated_memory(counted):
    """launcher.run() under plan_only: validate's plan is handed down (the same facts as
    plan_only's first: the declared epoch), then one plan with the estimated memory; without the
    probe, validate's plan is the plan."""
    calls, args = counted
    launcher.run([*SMALL, *args, "plan_only=true", "run_dir=probed"])
    assert calls == {"composed": 1, "concrete": 1, "plans": 2}
    assert "estimated" in json.loads(Path("probed/plan.json").read_text())["memory"]["reason"]
    calls.clear()
    launcher.run([*SMALL, *args, "plan_only=true", "memory.probe=false", "run_dir=fixed"])
    assert calls == {"composed": 1, "concrete": 1, "plans": 1}


@pytest.mark.parametrize("folder", [["run_dir=cli"], ["hydra.run.dir=cli"], []])
def test_the_command_line_composes_once_and_its_job_takes_the_checked_plan(counted, capsys, folder):
    """python -m launcher plan_only=true: the launching process composes the config and checks
    the job (validate: its concrete config, a plan); Hydra's run is handed that composition
    (its mode and its job's config: no composition of its own), and the job, here in the same
    process under the basic launcher, takes the checked config and plan and plans once more,
    with the estimate. Whether the command line names the folder (run_dir, hydra.run.dir) or
    the launcher makes the default one after the check. Hydra's records are those of its own
    composition: the run folder and the mode among its settings, the overrides as given."""
    calls, args = counted
    assert main([*SMALL, *args, "plan_only=true", *folder]) == 0
    assert calls == {"composed": 1, "concrete": 1, "plans": 2}
    out = capsys.readouterr().out
    run_dir = Path("cli") if folder else next(Path("outputs", "mnist1d").iterdir())
    assert f"plan written to {run_dir.absolute()}" in out
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra["overrides"]["hydra"] == [f"hydra.run.dir={run_dir}", "hydra.mode=RUN"]
    assert (hydra["run"]["dir"], hydra["mode"]) == (str(run_dir), "RUN")
    assert "plan_only=true" in hydra["overrides"]["task"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run_dir"] == str(run_dir.absolute())


def test_a_training_run_from_the_command_line_composes_once(counted, capsys):
    """python -m launcher (training, one process): one composition, one concrete config; the
    plans of a fresh run (launcher/training/job_plan.py): validate's, set_up's (the epoch counted
    in the built data), prepare's (the measured memory)."""
    calls, args = counted
    assert main([*SMALL, *args, "memory.budget_gb=2", "run_dir=cli"]) == 0
    assert calls == {"composed": 1, "concrete": 1, "plans": 3}
    capsys.readouterr()


def test_training_plans_the_counted_data_the_memory_and_a_moved_origin_only(counted):
    """A fresh run on one process: validate (the declared epoch), set_up (the epoch counted in
    the built data), prepare (the measured memory). Resumed at the same global batch the
    checkpoint moves nothing: no re-plan; resumed at another one (allowed), the origin moves:
    one."""
    calls, args = counted
    budget = ["memory.budget_gb=2"]  # the probe's budget, not this machine's free memory
    launcher.run([*SMALL, *args, *budget, "run_dir=probed"])
    assert calls == {"composed": 1, "concrete": 1, "plans": 3}

    fixed = [*SMALL, *args, "memory.probe=false", "checkpoint.every_samples=64", "run_dir=run"]
    calls.clear()
    launcher.run([*fixed, "trainer.stop_after_samples=128"])  # stops after step 2, saved there
    assert calls == {"composed": 1, "concrete": 1, "plans": 2}
    calls.clear()
    launcher.run([*fixed, "trainer.stop_after_samples=192"])  # resumes at step 2: same facts
    assert calls == {"composed": 1, "concrete": 1, "plans": 2}
    calls.clear()
    changed = ["global_batch=32", "checkpoint.allow_global_batch_change=true"]
    result = launcher.run([*fixed, *changed])
    assert calls == {"composed": 1, "concrete": 1, "plans": 3}
    plan = json.loads(Path(result["run_dir"], "plan.json").read_text())
    assert (plan["global_batch"], plan["origin_step"], plan["origin_samples"]) == (32, 3, 192)

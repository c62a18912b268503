"""The branched critical-batch probe (launcher/cbs.py): its arithmetic on a problem with a known
answer, and real branches from a real checkpoint (same samples per branch, the scaling rule's LR,
a cooldown to 0, refusals before anything trains). Also the early stop it builds on."""

from __future__ import annotations

import json
import math

import pytest

from launcher.cbs import crossing
from launcher.errors import ConfigError
from launcher.planning.plan import PlanInput, plan_batch
from launcher.planning.schedule import lr_at
from tests.helpers import SMALL_DATA, composed, read_metrics, run_process, train_here

ARGS = [
    *SMALL_DATA,
    "global_batch=32",
    "trainer.epochs=2",  # 2 x 1,600 / 32 = 100 steps
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every=1",
    "memory.probe=false",
    "checkpoint.every_samples=640",  # every 20 steps
    "checkpoint.keep=10",
]


def test_crossing_is_exact_where_the_gap_is_linear_in_log_k() -> None:
    # gap(k) = 0.02 log2(k): crosses 0.05 at k = 2^2.5, between k=4 (0.04) and k=8 (0.06)
    ks = [1, 2, 4, 8, 16]
    losses = [2.0 * (1 + 0.02 * math.log2(k)) for k in ks]
    found = crossing(32, ks, losses, 0.05)
    assert found.largest == 128
    assert found.interpolated == pytest.approx(32 * 2**2.5, rel=1e-12)
    assert found.gaps == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08])


def test_crossing_recovers_the_empirical_models_critical_batch() -> None:
    """McCandlish et al.: S samples at batch B do the work of S / (1 + B/B_crit) at the smallest
    batch; with loss a / samples of work, the gap of k x B to B is (k - 1) B / (B_crit + B), so
    the tolerance is crossed at k B = B + tol (B_crit + B): 248 for B_crit 400, B 32, tol 0.5."""
    b_crit, batch, tol, samples = 400.0, 32, 0.5, 1e5
    ks = [1, 2, 4, 8, 16, 32]
    losses = [(1 + k * batch / b_crit) / samples for k in ks]
    found = crossing(batch, ks, losses, tol)
    exact = batch + tol * (b_crit + batch)
    assert found.largest == 128
    assert found.interpolated == pytest.approx(exact, rel=0.02)  # log-linear between 128, 256


def test_crossing_edges() -> None:
    assert crossing(8, [1, 2, 4], [1.0, 1.0, 1.001], 0.01).interpolated is None  # never crossed
    diverged = crossing(8, [1, 2, 4], [1.0, 1.0, math.nan], 0.01)
    assert (diverged.largest, diverged.interpolated, diverged.gaps[2]) == (16, 32.0, math.inf)
    dip = crossing(8, [1, 2, 4], [1.0, 1.5, 1.0], 0.01)  # every smaller k must be within
    assert dip.largest == 8
    with pytest.raises(ValueError):
        crossing(8, [2, 4], [1.0, 1.0], 0.01)


def test_an_early_stop_keeps_the_schedule_and_cools_down_to_zero() -> None:
    cfg = composed([*ARGS, "trainer.stop_after_samples=1000", "trainer.stop_cooldown_samples=320"])
    plan = plan_batch(PlanInput(cfg, 1, 1600))
    full = plan_batch(PlanInput(composed(ARGS), 1, 1600))
    assert (plan.steps, plan.stop_step, plan.end_step) == (100, 32, 32)  # 32 x 32 = 1,024 >= 1000
    assert plan.cooldown == (1024 - 320, 1024)
    for samples in (0, 320, 672, 704):  # before the cooldown: the whole run's schedule
        assert lr_at(plan, samples) == lr_at(full, samples)
    for samples in (736, 960, 992):
        want = lr_at(full, samples) * (1024 - samples) / 320
        assert lr_at(plan, samples) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ConfigError, match="not before the end of the run"):
        plan_batch(PlanInput(composed([*ARGS, "trainer.stop_after_samples=3200"]), 1, 1600))
    with pytest.raises(ConfigError, match="stop_cooldown_samples"):
        composed([*ARGS, "trainer.stop_cooldown_samples=10"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """A 100-step run at batch 32 with checkpoints every 20 steps."""
    cwd = tmp_path_factory.mktemp("cbs")
    res = train_here([*ARGS, f"data.cache_dir={data_cache}", "run_dir=run"], cwd)
    assert res.returncode == 0, res.stderr
    return cwd / "run"


def _cbs(args: list[str], cwd):
    import sys

    return run_process([sys.executable, "-m", "launcher.cbs", *args], cwd)


@pytest.mark.slow
def test_branches_train_the_same_samples_at_k_times_the_batch(trained) -> None:
    args = [str(trained), "--step", "40", "--k", "1,2,4", "--samples", "384"]
    res = _cbs([*args, "--", "trainer.tensorboard=true"], trained.parent)  # the documented form
    assert res.returncode == 0, res.stderr
    for k in (1, 2, 4):  # the override reached every branch (the probe turns it off otherwise)
        assert (
            "  tensorboard: true" in (trained / "cbs-step40" / f"k{k}" / "config.yaml").read_text()
        )
        assert (trained / "cbs-step40" / f"k{k}" / "tensorboard").is_dir()
    result = json.loads((trained / "cbs-step40" / "cbs.json").read_text())
    assert (result["consumed_samples"], result["branch_samples"]) == (1280, 384)
    assert result["samples_trained"] == 3 * 384 and result["cooldown_samples"] == 192
    assert [b["global_batch"] for b in result["branches"]] == [32, 64, 128]
    base_lr = 0.03  # mnist1d: 0.03 per 32 samples, the linear rule
    assert [b["lr"] for b in result["branches"]] == pytest.approx([base_lr, 2 * base_lr, 0.12])
    run_lr = {r["samples"]: r["lr"] for r in read_metrics(trained) if "lr" in r}
    losses = []
    for b in result["branches"]:
        records = read_metrics(trained / "cbs-step40" / f"k{b['k']}")
        steps = [r for r in records if "loss" in r and "lr" in r]
        k = b["k"]
        assert [r["samples"] for r in steps] == [1280 + 32 * k * i for i in range(1, 12 // k + 1)]
        # the second half cools down: the LR of every step starting there falls, to 1/6 for k=1
        cooling = [r["lr"] for r in steps if r["samples"] - 32 * k >= 1280 + 192]
        assert cooling and all(a > b for a, b in zip(cooling, cooling[1:], strict=False))
        if k == 1:  # the run's own LR at the same step x the fall to 0 at 1,664 samples
            for r in steps:
                start = r["samples"] - 32
                factor = min((1664 - start) / 192, 1.0)
                assert r["lr"] == pytest.approx(run_lr[r["samples"]] * factor, rel=1e-12)
        final = [r for r in records if r.get("final")][0]
        assert final["stopped_early"] and final["step"] == 40 + 12 // k
        losses.append([r for r in records if "eval_loss" in r][-1]["eval_loss"])
    assert [b["eval_loss"] for b in result["branches"]] == losses
    assert result["branches"][0]["gap"] == 0.0
    assert result["noise_scale_at_checkpoint"] is not None
    assert "critical batch here:" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "1,2,32", "--samples", "1024"], "k=32: global_batch=1024: the plan trains it"),
        (["--samples", "100"], "multiple of the largest branch batch 128"),
        (["--k", "2,4"], "must start at 1"),
        (["--step", "7"], "no checkpoint of that step"),
        (["--tolerance", "2"], "--tolerance=2.0: must be in (0, 1)"),
        (["--samples", "1920"], "not before the run's end"),
    ],
)
def test_bad_input_is_one_line_and_nothing_trains(trained, args, message, monkeypatch, capsys):
    """launcher.cbs.main in this process (test_no_checkpoint_before_the_end starts a process)."""
    from launcher.cbs import main

    out = trained.parent / "refused"
    monkeypatch.chdir(trained)
    assert main([str(trained), "--step", "40", "--k", "1,2,4", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


def _forge(run, state: dict) -> None:
    """Step 40's checkpoint replaced by `state`, its digest file matching."""
    import hashlib

    import torch

    path = run / "checkpoints" / "step-000000040.pt"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".sha256").write_text(digest + "\n")


CORRUPT = {
    "plan-types": lambda run: (run / "plan.json").write_text('{"global_batch": 32, "steps": "x"}'),
    "plan-bytes": lambda run: (run / "plan.json").write_bytes(b"\xff"),
    "metrics": lambda run: (run / "metrics.jsonl").write_text('{"step": 1, "samples": -4}\n'),
    "digest": lambda run: (run / "checkpoints" / "step-000000040.pt").write_bytes(b"x"),
    "forged": lambda run: _forge(run, {"consumed_samples": 1280, "step": 40}),
}


@pytest.mark.parametrize(
    ("what", "args", "message"),
    [
        ("", ["optim.base_lr=0.1"], "optim.base_lr=0.1: launcher overrides for the branches go"),
        ("", ["--", "global_batch=64"], "global_batch=64: the probe sets global_batch for every"),
        ("", ["--", "+foo"], "+foo: not a launcher override (KEY=VALUE with a dotted key"),
        ("", ["--", "optim.base_lr"], "optim.base_lr: not a launcher override"),
        ("", ["--bogus"], "unrecognized arguments: --bogus"),
        ("", ["--out", "/proc/x"], "--out='/proc/x': cannot write there"),
        ("plan-types", [], "plan.json': not a plan (steps='x': not a positive integer)"),
        ("plan-bytes", [], "plan.json': not a plan ('utf-8' codec can't decode"),
        ("metrics", [], "metrics.jsonl' line 1: not a metrics record (samples=-4: not a count)"),
        ("digest", [], "step-000000040.pt is not a usable checkpoint (its SHA-256 does not match"),
        (
            "forged",
            [],
            "step-000000040.pt is not a usable checkpoint (it is not a launcher checkpoint",
        ),
    ],
)
def test_malformed_input_is_one_line_in_process(
    trained, tmp_path, monkeypatch, capsys, what, args, message
) -> None:
    """launcher.cbs.main in this process: exit 2, one line, no branch folder; a run folder
    that is not what the launcher writes is a copy of the trained one, corrupted."""
    import shutil

    from launcher.cbs import main

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("cbs-*", "refused"))
    if what:
        CORRUPT[what](run)
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "out")]
    assert main([str(run), "--step", "40", "--k", "1,2", *out, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launcher.cbs: error: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists() and not list(run.glob("cbs-*"))


@pytest.mark.slow
def test_no_checkpoint_before_the_end(tmp_path, data_cache) -> None:
    """The run in this process; launcher.cbs as a process (its refusal's exit code)."""
    res = train_here([*ARGS[:-2], f"data.cache_dir={data_cache}", "run_dir=run"], tmp_path)
    assert res.returncode == 0, res.stderr
    res = _cbs([str(tmp_path / "run")], tmp_path)
    assert res.returncode == 2 and "no checkpoint before the end of the run" in res.stderr


@pytest.mark.slow
def test_a_ramped_run_is_refused(tmp_path, data_cache, monkeypatch, capsys) -> None:
    """The run and launcher.cbs in this process."""
    from launcher.cbs import main

    ramp = ["ramp.start_batch=16", "ramp.samples=320"]
    res = train_here([*ARGS, *ramp, f"data.cache_dir={data_cache}", "run_dir=run"], tmp_path)
    assert res.returncode == 0, res.stderr
    monkeypatch.chdir(tmp_path)
    assert main([str(tmp_path / "run"), "--k", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "trained with a batch ramp" in err
    assert err.count("\n") == 1 and not list((tmp_path / "run").glob("cbs-*"))

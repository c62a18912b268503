"""Step health (launcher/training/guard.py): non-finite steps skipped on every rank alike,
divergence stopped in one line (exit 4), loss spikes as events, nothing non-finite in a file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launcher.training.guard import DIVERGED, NON_FINITE, SPIKE, WINDOW, Health
from tests.helpers import run_cli

SMALL = ["data.num_samples=4000", "global_batch=64", "trainer.progress=false"]
SMALL += ["trainer.tensorboard=false", "trainer.log_every=1", "trainer.noise_scale=false"]


def _strict(path) -> list[dict]:
    """metrics.jsonl read as JSON allows it (no NaN or Infinity tokens)."""

    def refuse(token: str) -> None:
        raise ValueError(f"{token} in {path}: not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_health_flags_a_non_finite_step_and_a_spike() -> None:
    model = torch.nn.Linear(2, 1)
    health = Health(spike_factor=5.0, diverge_factor=0)
    assert health.bits(torch.tensor(float("nan")), model, check_grads=False) == NON_FINITE
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    assert health.bits(torch.tensor(1.0), model, check_grads=True) == NON_FINITE
    assert health.bits(torch.tensor(1.0), model, check_grads=False) == 0  # fp16: the scaler's
    for _ in range(WINDOW - 1):
        health.bits(torch.tensor(1.0), model, check_grads=False)
        health.applied()
    assert health.bits(torch.tensor(9.0), model, check_grads=False) == 0  # window not full yet
    health.bits(torch.tensor(1.0), model, check_grads=False)
    health.applied()
    assert health.bits(torch.tensor(5.5), model, check_grads=False) == SPIKE
    assert health.bits(torch.tensor(4.5), model, check_grads=False) == 0
    assert (
        Health(spike_factor=0, diverge_factor=0).bits(torch.tensor(1e9), model, check_grads=False)
        == 0
    )


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.slow
def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(devices, tmp_path, data_cache):
    """LAUNCHER_TEST_LOSS makes the last rank's loss NaN at step 3: every rank drops the step
    (the flag gather), the run goes on and ends with replicas that agree (checked at the end)."""
    rank = devices - 1
    args = [*SMALL, f"data.cache_dir={data_cache}", "trainer.epochs=0.1", "run_dir=run"]
    args.append(f"trainer.devices={devices}")
    res = run_cli(args, tmp_path, env={"LAUNCHER_TEST_LOSS": f"{rank}:3:nan"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"non-finite loss or gradients at step 3 on rank(s) [{rank}]; step skipped" in res.stderr
    records = _strict(tmp_path / "run" / "metrics.jsonl")
    (event,) = [r for r in records if r.get("event") == "non_finite"]
    assert event["step"] == 3 and event["ranks"] == [rank] and event["skipped"] is True
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 5]  # 5 steps, 3 not learned
    assert (tmp_path / "run" / "model_final.pt").exists()


@pytest.mark.slow
def test_a_run_that_keeps_diverging_stops_in_one_line(tmp_path, data_cache) -> None:
    """The issue's optim.base_lr=1000 (unclipped): three non-finite steps in a row stop the run
    with exit 4 and one line naming the steps, the LR and what to try; no checkpoint, no final
    weights, and metrics.jsonl stays valid JSON."""
    args = [*SMALL, f"data.cache_dir={data_cache}", "trainer.epochs=2", "run_dir=run"]
    res = run_cli([*args, "optim.base_lr=1000", "optim.clip_grad_norm=0"], tmp_path)
    assert res.returncode == 4, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("launcher: diverged: non-finite loss or gradients at steps ")
    assert "in a row (lr " in last and "Try: lower optim.base_lr" in last
    assert "Traceback" not in res.stderr
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "model_final.pt").exists()
    records = _strict(run / "metrics.jsonl")
    assert len([r for r in records if r.get("event") == "non_finite"]) == 3
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def _fed(health: Health, losses: list[float]) -> list[int]:
    """The bits of each step, every step applied (a finite divergence is, until it is caught)."""
    model, found = torch.nn.Linear(2, 1), []
    for loss in losses:
        found.append(health.bits(torch.tensor(loss), model, check_grads=False))
        health.applied()
    return found


def test_a_loss_that_climbs_and_stays_up_is_a_divergence() -> None:
    """The median of the last WINDOW applied steps above diverge_factor x the first loss."""
    health = Health(spike_factor=0, diverge_factor=10)
    bits = _fed(health, [2.0, *[3.0] * WINDOW, *[25.0] * (WINDOW // 2 + 2)])
    assert not any(b & DIVERGED for b in bits[:-1]) and bits[-1] & DIVERGED
    assert health.start == 2.0 and health.median == 25.0


@pytest.mark.parametrize(
    ("losses", "why"),
    [
        ([2.0, *[1e6, 1.5] * WINDOW], "spikes in half the window: the median is not up"),
        ([2.0, *[19.0] * 3 * WINDOW], "up 9.5x: below the factor"),
        ([-1.0, *[1e6] * 2 * WINDOW], "a start that is not positive: the ratio means nothing"),
        ([0.0, *[1e6] * 2 * WINDOW], "a start that is not positive: the ratio means nothing"),
    ],
)
def test_what_is_no_divergence(losses, why) -> None:
    assert not any(b & DIVERGED for b in _fed(Health(0, 10), losses)), why
    assert not any(b & DIVERGED for b in _fed(Health(0, 0), [2.0, *[1e6] * 3 * WINDOW]))


def test_the_start_of_a_resumed_run_is_the_checkpoints() -> None:
    health = Health(spike_factor=0, diverge_factor=10, start=0.5)
    bits = _fed(health, [*[6.0] * (WINDOW + 1)])
    assert bits[-1] & DIVERGED and health.start == 0.5


@pytest.mark.slow
def test_a_run_that_diverges_without_nan_stops_and_gets_no_advice(tmp_path, data_cache) -> None:
    """The issue's run: optim.base_lr=1e6 (the loss climbs to ~1e6 and stays, every value
    finite): exit 4, one line, a `diverged` event, no advice, no final weights."""
    args = [*SMALL, f"data.cache_dir={data_cache}", "trainer.epochs=1", "run_dir=run"]
    args += ["optim.base_lr=1e6"]
    res = run_cli(args, tmp_path)
    assert res.returncode == 4, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith("launcher: diverged")]
    assert len(lines) == 1 and "the loss stayed above 10 x its value at the start" in lines[0]
    records = _strict(tmp_path / "run" / "metrics.jsonl")
    (event,) = [r for r in records if r.get("event") == "diverged"]
    losses = [r["loss"] for r in records if "loss" in r]
    assert event["step"] == len(losses) + 1 and math.isfinite(max(losses))
    assert "batch-size advice" not in res.stdout and "next: train" not in res.stdout
    assert not (tmp_path / "run" / "model_final.pt").exists()


def test_parameters_that_overflow_are_never_saved(tmp_path) -> None:
    """Parameters a finite step made non-finite (float32 overflow; the largest LR a run takes,
    1e9, cannot get there through a step whose gradient norm is finite, so the state is made
    so here): the checkpoint due is refused (every rank checks), Diverged (exit 4), nothing
    written."""
    from launcher.backends.accelerate import AccelerateBackend
    from launcher.models import build_model
    from launcher.models.loss import CrossEntropy
    from launcher.optim import build_optimizer
    from launcher.planning.plan import PlanInput, plan_batch
    from launcher.training.checkpointer import Checkpointer
    from launcher.training.guard import Diverged
    from launcher.training.metrics import MetricsSink
    from launcher.types.bundles import Trainee
    from tests.helpers import composed

    cfg = composed(["model=mlp", "global_batch=64", f"run_dir={tmp_path / 'run'}"])
    plan = plan_batch(PlanInput(cfg, world_size=1, epoch_samples=640))
    backend = AccelerateBackend(cfg, "cpu")
    model = build_model(cfg.model, _spec())
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    model, optimizer = backend.prepare(model, optimizer, plan)
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.inf
    (tmp_path / "run").mkdir()
    sink = MetricsSink(None, total_steps=plan.steps, tensorboard=False, progress=False)
    saver = Checkpointer(
        cfg,
        tmp_path / "run",
        Trainee(model, optimizer, backend, torch.float32, CrossEntropy()),
        sink,
        None,
    )
    with pytest.raises(
        Diverged, match="the parameters are not finite after step 1; checkpoint not written"
    ):
        saver.save(1, plan)
    assert Diverged.exit_code == 4 and list((tmp_path / "run").iterdir()) == []


def _spec():
    from launcher.data import DataSpec

    return DataSpec((1, 40), 10)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.slow
def test_a_loss_spike_is_an_event_and_optionally_skipped(skip, tmp_path, data_cache) -> None:
    """Step 25's loss x 50 (after a full window of 20 applied steps): a loss_spike event; the
    step is applied unless trainer.skip_spikes."""
    args = [*SMALL, f"data.cache_dir={data_cache}", "trainer.epochs=0.6", "run_dir=run"]
    args.append(f"trainer.skip_spikes={str(skip).lower()}")
    res = run_cli(args, tmp_path, env={"LAUNCHER_TEST_LOSS": "0:25:50"})
    assert res.returncode == 0, res.stderr[-3000:]
    records = _strict(tmp_path / "run" / "metrics.jsonl")
    (event,) = [r for r in records if r.get("event") == "loss_spike"]
    assert event["step"] == 25 and event["skipped"] is skip
    assert event["rank0_loss"] > 5 * event["rank0_recent_mean"]
    assert (25 in [r["step"] for r in records if "loss" in r]) is not skip


def _with_grads(seed: int) -> torch.nn.Module:
    """A small model in which one gradient is large (so a clip at 1.0 changes it)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x, y = torch.randn(32, 6) * 10, torch.randint(0, 3, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return model


def test_the_health_checks_norms_serve_the_clip_and_the_meter_bit_for_bit() -> None:
    """The gradient norms the health check computes are reused on one rank (loop._checked) by
    the clip (accelerate.clip) and the noise meter: the results are the same bits as computing
    them again, torch.nn.utils.clip_grad_norm_ and meter.squared_norm."""
    from launcher.backends.accelerate import clip
    from launcher.batchsize.meter import squared_norm

    for seed in range(3):
        mine, theirs = _with_grads(seed), _with_grads(seed)
        health = Health(spike_factor=0, diverge_factor=0)
        assert health.bits(torch.tensor(1.0), mine, check_grads=True) == 0
        assert health.norms is not None and health.norms.shape == (4,)
        assert torch.equal(health.norms.double().square().sum(), squared_norm(theirs))
        total = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 1.0)
        assert total > 1.0  # the clip did something
        clip(list(mine.parameters()), 1.0, health.norms)
        for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)


def test_no_norms_are_kept_from_a_step_whose_loss_is_not_finite() -> None:
    health = Health(spike_factor=0, diverge_factor=0)
    model = _with_grads(0)
    assert health.bits(torch.tensor(1.0), model, check_grads=True) == 0
    assert health.bits(torch.tensor(float("inf")), model, check_grads=True) == NON_FINITE
    assert health.norms is None
    assert health.bits(torch.tensor(1.0), model, check_grads=False) == 0
    assert health.norms is None  # fp16: the scaler owns the gradients, none computed

"""Step health (launcher/training/guard.py): non-finite steps skipped on every rank alike,
divergence stopped in one line (exit 4), loss spikes as events, nothing non-finite in a file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launcher.training.guard import NON_FINITE, SPIKE, WINDOW, Health
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
    health = Health(spike_factor=5.0)
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
    assert Health(spike_factor=0).bits(torch.tensor(1e9), model, check_grads=False) == 0


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


def test_parameters_that_overflow_are_never_saved(tmp_path, data_cache) -> None:
    """An LR so large that a finite, clipped step overflows the parameters: the checkpoint due
    after it is refused (every rank checks), exit 4."""
    args = [*SMALL, f"data.cache_dir={data_cache}", "trainer.epochs=0.2", "run_dir=run"]
    args += ["optim.base_lr=1e38", "global_batch=32", "checkpoint.every_samples=32"]
    res = run_cli(args, tmp_path)
    assert res.returncode == 4, res.stderr[-3000:]
    assert "the parameters are not finite after step 1; checkpoint not written" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("skip", [False, True])
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

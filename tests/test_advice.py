"""Batch-size advice from a run's metrics: the run's critical batch, the throughput model, the
goodput optimum (checked against a brute-force search) and the recommended batch."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.advice import advise, critical_batch, efficiency, format_advice, throughput

PLAN = {"global_batch": 512, "world_size": 2, "epoch_samples": 32000}


def _records(noise: float, t_sample: float, t_step: float, n: int = 20) -> list[dict]:
    lines = [{"step": 0, "loss": 2.0, "samples": 0, "samples_per_s": 1.0}]  # nothing measured
    for i in range(1, n + 1):
        lines.append(
            {
                "step": 10 * i,
                "samples": 5120 * i,
                "loss": 1.0,
                "samples_per_s": 9000.0,
                "noise_scale": noise,
                "sample_compute_s": t_sample,
                "step_overhead_s": t_step,
            }
        )
        lines.append({"step": 10 * i, "eval_accuracy": 0.5, "noise_scale": 1e9})  # not training
    return lines


def test_efficiency_and_throughput_models() -> None:
    assert efficiency(512, 400, 512) == 1.0
    assert efficiency(1024, 400, 512) == pytest.approx(912 / 1424)
    assert throughput(512, 2, 1e-5, 1e-3) == pytest.approx(512 / (1e-3 + 256 * 1e-5))


def test_critical_batch_weights_each_estimate_by_the_progress_a_step_makes() -> None:
    lines = [
        {"loss": 1.0, "noise_scale": 100.0, "global_batch": 100},  # weight 1/2
        {"loss": 1.0, "noise_scale": 300.0, "global_batch": 300},  # weight 1/2 (ramp-up line)
        {"loss": 1.0, "noise_scale": None},
        {"loss": 1.0, "noise_scale": -5.0},
    ]
    assert critical_batch(lines, 100) == (pytest.approx(200.0), 2)
    lines[1]["global_batch"] = 100  # weight 1/4 now
    assert critical_batch(lines, 100)[0] == pytest.approx((50 + 75) / 0.75)
    assert critical_batch(lines[2:], 100) is None


def test_recommendation_is_the_goodput_optimum() -> None:
    noise, t_sample, t_step = 400.0, 1e-5, 1e-3
    advice = advise(_records(noise, t_sample, t_step), PLAN)
    assert advice.noise_scale == pytest.approx(noise) and advice.points == 20
    assert (advice.t_sample, advice.t_step) == (t_sample, t_step)
    # brute force over a fine grid of the same goodput: the closed form sqrt(phi W t_step/t_s)
    grid = np.linspace(1, 20000, 2_000_000)
    goodput = grid / (t_step + grid / 2 * t_sample) / (noise + grid)
    assert advice.best == pytest.approx(grid[goodput.argmax()], rel=1e-3)
    assert advice.best == pytest.approx((noise * 2 * t_step / t_sample) ** 0.5)  # 283
    batches = [r[0] for r in advice.rows]
    assert batches == [2 * 2**k for k in range(14)]  # world x 2^k up to the training set
    by_batch = {b: b / (t_step + b / 2 * t_sample) * (noise + 512) / (noise + b) for b in batches}
    assert advice.recommended == max(by_batch, key=by_batch.get) == 256
    now = by_batch[512]
    for b, speed, eff, gain in advice.rows:
        assert gain == pytest.approx(by_batch[b] / now, rel=1e-12)
        assert speed == pytest.approx(throughput(b, 2, t_sample, t_step))
        assert eff == pytest.approx(efficiency(b, noise, 512))
    text = format_advice(advice)
    assert "recommended global batch: 256 (now 512)" in text
    assert "= 283" in text and "9,000 samples/s at global batch 512" in text


def test_no_advice_without_a_noise_scale_or_timing() -> None:
    lines = _records(400.0, 1e-5, 1e-3)
    no_noise = [{k: v for k, v in r.items() if k != "noise_scale"} for r in lines]
    untimed = [{k: v for k, v in r.items() if k != "sample_compute_s"} for r in lines]
    assert advise(no_noise, PLAN) is None and advise(untimed, PLAN) is None

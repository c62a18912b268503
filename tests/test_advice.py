"""Batch-size advice from a run's metrics: the run's critical batch, the measured step time, the
micro-step timings, and the recommended batch against an independent goodput computation."""

from __future__ import annotations

import pytest

from launcher.batchsize.advice import (
    advise,
    critical_batch,
    efficiency,
    format_advice,
    seconds_per_step,
)

PLAN = {
    "global_batch": 512,
    "world_size": 2,
    "epoch_samples": 32000,
    "micro_batch": 128,
    "accumulation": 2,
}
MICRO = {m: 1e-3 + 2e-5 * m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256)}  # seconds
STEP = 1e-2  # seconds per training step at 512 (train_s grows by 10 steps x STEP per line)


def _records(noise: float = 400.0) -> list[dict]:
    lines = [{"event": "ramp", "step": 0, "global_batch": 512}]
    for i in range(1, 21):
        step = 10 * i
        lines.append(
            {
                "step": step,
                "samples": 512 * step,
                "global_batch": 512,
                "loss": 1.0,
                "train_s": STEP * step + (0.5 if i > 10 else 0.0),  # a slow interval: median
                "grad_sq": 1.0,
                "grad_trace": noise,
                "noise_scale": noise,
            }
        )
        lines.append({"step": step, "eval_accuracy": 0.5, "grad_sq": 1e-9, "grad_trace": 1.0})
    seconds = {str(m): t for m, t in MICRO.items()}
    lines.append({"step": 200, "micro_step_seconds": seconds, "micro_step_out_of_memory_at": None})
    return lines


def test_efficiency() -> None:
    assert efficiency(512, 400, 512) == 1.0
    assert efficiency(1024, 400, 512) == pytest.approx(912 / 1424)


def test_critical_batch_weights_each_estimate_by_the_progress_a_step_makes() -> None:
    lines = [
        {"loss": 1.0, "grad_sq": 1.0, "grad_trace": 100.0, "global_batch": 100},  # w 1/2
        {"loss": 1.0, "grad_sq": 1.0, "grad_trace": 300.0, "global_batch": 300},  # w 1/2 (ramp)
        {"loss": 1.0},  # before the first estimate
    ]
    assert critical_batch(lines, 100) == (pytest.approx(200.0), 2)
    lines[1]["global_batch"] = 100  # phi 300 at batch 100: weight 1/4
    assert critical_batch(lines, 100)[0] == pytest.approx((50 + 75) / 0.75)
    noisy = {"loss": 1.0, "grad_sq": -0.5, "grad_trace": 40.0, "global_batch": 100}
    # |G|^2 average not positive: phi -> infinity, weight 0, w phi -> B = 100 (not dropped)
    assert critical_batch([*lines, noisy], 100)[0] == pytest.approx((50 + 75 + 100) / 0.75)
    assert critical_batch([lines[2], noisy], 100) is None


def test_step_time_is_the_median_at_the_runs_batch() -> None:
    lines = [
        {"step": 10, "train_s": 1.0, "global_batch": 256},  # ramp-up lines: another batch
        {"step": 20, "train_s": 2.0, "global_batch": 256},
        {"step": 30, "train_s": 4.0, "global_batch": 512},
        {"step": 40, "train_s": 4.5, "global_batch": 512},
        {"step": 50, "train_s": 5.0, "global_batch": 512},
        {"step": 52, "train_s": 9.0, "global_batch": 512},  # one slow interval
    ]
    assert seconds_per_step(lines, 512) == pytest.approx(0.05)
    assert seconds_per_step(lines[:3], 512) is None


def test_recommendation_is_the_goodput_optimum_of_the_measured_timings() -> None:
    advice = advise(_records(), PLAN)
    assert advice.noise_scale == pytest.approx(400.0) and advice.points == 20
    assert advice.step_seconds == pytest.approx(STEP)
    t_step = STEP - 2 * MICRO[128]  # the measured step minus its two micro-steps
    assert advice.t_step == pytest.approx(t_step)
    expected = {}
    for k in range(14):  # world x 2^k up to the training set
        b = 2 * 2**k
        per_device = b // 2
        m = min(per_device, 256)  # the largest measured micro-batch dividing it
        seconds = STEP if b == 512 else t_step + per_device // m * MICRO[m]
        expected[b] = (m if b != 512 else 128, b / seconds, efficiency(b, 400.0, 512))
    assert [r[0] for r in advice.rows] == list(expected)
    now = expected[512][1]
    for b, micro, speed, eff, gain in advice.rows:
        m, s, e = expected[b]
        assert (micro, speed, eff) == (m, pytest.approx(s), pytest.approx(e))
        assert gain == pytest.approx(s * e / now)
    goodput = {b: s * e for b, (_, s, e) in expected.items()}
    best = max(goodput, key=goodput.get)
    assert advice.recommended == best == 256
    assert advice.near == tuple(b for b, g in goodput.items() if g >= 0.9 * goodput[best])
    text = format_advice(advice)
    assert "recommended global batch: 256 (now 512)" in text
    assert "51,200 samples/s at global batch 512 (10 ms per step" in text


def test_no_advice_without_a_noise_scale_or_timings() -> None:
    lines = _records()
    no_noise = [{k: v for k, v in r.items() if k not in ("grad_sq", "grad_trace")} for r in lines]
    untimed = [r for r in lines if "micro_step_seconds" not in r]
    no_train_s = [{k: v for k, v in r.items() if k != "train_s"} for r in lines]
    for records in (no_noise, untimed, no_train_s):
        assert advise(records, PLAN) is None

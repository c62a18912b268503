"""Batch-size advice from a run's metrics: the run's critical batch, the measured step time, the
micro-step timings, and the recommended batch against an independent goodput computation."""

from __future__ import annotations

import math

import pytest

from launcher.batchsize import spread
from launcher.batchsize.advice import (
    advise,
    critical_batch,
    efficiency,
    format_advice,
    seconds_per_step,
)
from launcher.batchsize.outcome import why_not_learned
from launcher.batchsize.run_advice import advice_or_why

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
    # the step times do not vary (one slow interval is not the median's business): no spread,
    # so only the best is within the spread of the best
    assert advice.interval_spread == pytest.approx(0.0, abs=1e-12) and advice.near == (256,)
    text = format_advice(advice)
    assert "recommended global batch: 256 (now 512): its goodput gain, 7.9%, is above" in text
    assert "51,200 samples/s at global batch 512 (10 ms per step" in text


def test_no_advice_without_a_noise_scale_or_timings() -> None:
    lines = _records()
    no_noise = [{k: v for k, v in r.items() if k not in ("grad_sq", "grad_trace")} for r in lines]
    untimed = [r for r in lines if "micro_step_seconds" not in r]
    no_train_s = [{k: v for k, v in r.items() if k != "train_s"} for r in lines]
    for records in (no_noise, untimed, no_train_s):
        assert advise(records, PLAN) is None


# ---------------------------------------------------------------------------------------------
# the spread: recommend a change only when it gains more than the measurement's spread

NOW = {"global_batch": 64, "world_size": 1, "epoch_samples": 32000, "micro_batch": 64}
NOW |= {"accumulation": 1}
CHEAP = {m: 1e-3 + 2e-5 * m for m in (8, 16, 32, 64, 128, 256, 512)}  # seconds per micro-step
CHEAP_STEP = 1e-3 + CHEAP[64]  # 1 ms besides the micro-step: 128 gains 26.4%, 256 30.3%


def _timed(jitter: float, repeats: dict[int, list[float]] | None = None, lines: int = 40):
    """A run at batch 64 whose step time per log interval cycles through (1 - jitter, 1,
    1 + jitter) x CHEAP_STEP (median CHEAP_STEP, robust spread 1.4826 x jitter), noise scale
    400, micro-steps timed at CHEAP (each repeat logged where `repeats` gives it)."""
    out, train_s = [], 0.0
    for i in range(1, lines + 1):
        train_s += 10 * CHEAP_STEP * (1 + jitter * ((i % 3) - 1))
        out.append(
            {"step": 10 * i, "samples": 640 * i, "global_batch": 64, "loss": 2.0 - i / lines}
            | {"train_s": train_s, "grad_sq": 1.0, "grad_trace": 400.0, "noise_scale": 400.0}
        )
    timing = {"step": 10 * lines, "micro_step_seconds": {str(m): t for m, t in CHEAP.items()}}
    if repeats is not None:
        timing["micro_step_repeats"] = {str(m): v for m, v in repeats.items()}
    return [*out, timing]


def _wide(m: int, half: float) -> dict[int, list[float]]:
    """Every micro-step's repeats agree, but micro-batch m's spread by +-`half` of it."""
    out = {k: [t, t, t] for k, t in CHEAP.items()}
    out[m] = [CHEAP[m] * (1 - half), CHEAP[m], CHEAP[m] * (1 + half)]
    return out


@pytest.mark.parametrize(
    ("jitter", "repeats", "recommended", "says"),
    [
        (0.0, None, 256, "its goodput gain, 30.3%, is above the measurement's spread of"),
        (  # 256 is best, 128 within the best's spread of it: the smaller change
            0.05,
            None,
            128,
            "the best gain, 30.3% at 256, is above the measurement's spread of",
        ),
        (0.25, None, 64, "keep global_batch=64: the best gain, 30.3% at 256, is within the"),
        (0.0, _wide(256, 0.2), 128, "128's 26.4% is within that spread of it"),
        (0.0, _wide(64, 0.8), 64, "keep global_batch=64: the best gain, 30.3% at 256, is within"),
    ],
)
def test_a_change_is_recommended_only_beyond_the_spread(jitter, repeats, recommended, says):
    advice = advise(_timed(jitter, repeats), NOW)
    assert advice.best == 256 and advice.recommended == recommended
    assert advice.interval_spread == pytest.approx(1.4826 * jitter)
    rows = {r[0]: r for r in advice.rows}
    assert rows[256][4] == pytest.approx(1.303, abs=5e-4)
    assert rows[128][4] == pytest.approx(1.264, abs=5e-4)
    spreads = dict(zip(rows, advice.spreads, strict=True))
    assert spreads[64] == 0.0  # the run's own batch: the reference
    within = {b for b, r in rows.items() if r[4] >= rows[256][4] - spreads[256]}
    assert set(advice.near) == within and recommended in within
    text = format_advice(advice)
    assert says in text
    assert "(now 64)" in text and "spread:" in text


def test_the_spread_is_carried_to_each_goodput_ratio() -> None:
    """ln(ratio) = const + ln T0 - ln T(B), T(B) = T0 - a t(m0) + n t(m): by hand."""
    spreads = {128: 0.1, 256: 0.1}
    # another micro-batch: T = 10 - 2 x 3 + 5 = 9
    got = spread.ratio_spread((1, 256), (2, 128), (10.0, 0.2), {128: 3.0, 256: 5.0}, spreads)
    want = math.hypot((1 / 10 - 1 / 9) * 0.2, 2 / 9 * 0.1 * 3.0, 1 / 9 * 0.1 * 5.0)
    assert got == pytest.approx(want, rel=1e-12)
    # the run's own micro-batch, 4 of them: T = 10 - 2 x 3 + 4 x 3 = 16, d/dt(m0) = (2 - 4) / 16
    got = spread.ratio_spread((4, 128), (2, 128), (10.0, 0.2), {128: 3.0}, spreads)
    assert got == pytest.approx(math.hypot((1 / 10 - 1 / 16) * 0.2, 2 / 16 * 0.3), rel=1e-12)
    # the step besides the micro-steps clamped at 0 (T0 below a x t(m0)): T = 5
    got = spread.ratio_spread((1, 256), (2, 128), (5.0, 0.2), {128: 3.0, 256: 5.0}, spreads)
    assert got == pytest.approx(math.hypot(1 / 5 * 0.2, 1 / 5 * 0.5), rel=1e-12)


@pytest.mark.parametrize(
    ("spans", "want"),
    [
        ([1.0, 1.0, 1.0], 0.0),
        ([0.9, 1.0, 1.1], 1.4826 * 0.1),
        ([0.9, 1.0, 1.1, 5.0], 1.4826 * 0.1 / 1.05),  # one slow interval barely moves it
        ([1.0, 1.2], None),  # too few intervals to tell
    ],
)
def test_interval_spread(spans, want) -> None:
    got = spread.interval_spread(spans)
    assert got == (None if want is None else pytest.approx(want))


def test_repeat_spread_and_each_timings_spread() -> None:
    assert spread.repeat_spread([1.0, 1.2, 1.1]) == pytest.approx(0.1 / 1.1)
    assert spread.repeat_spread([2.0]) == 0.0
    each = spread.micro_spreads({8: 1.0, 16: 1.0, 32: 1.0}, {8: [1.0, 1.5, 1.2]}, 0.05)
    assert each == {8: pytest.approx(0.25 / 1.2), 16: 0.05, 32: 0.05}  # old runs: no repeats


def test_too_few_intervals_keep_the_runs_batch() -> None:
    advice = advise(_timed(0.0, lines=3), NOW)  # 2 intervals: their spread is not measured
    assert advice.interval_spread is None and advice.best == 256 and advice.recommended == 64
    text = format_advice(advice)
    assert "keep global_batch=64: the best gain, 30.3% at 256, cannot be told from" in text
    assert "spread: not measured (2 timed log interval(s) at this batch; 3 are needed)" in text


# ---------------------------------------------------------------------------------------------
# advice only from runs that learned


def _run(first_loss: float | None, final_eval: float | None, *extra: dict) -> list[dict]:
    lines = [
        {"step": 5, "samples": 320, "loss": None},  # a non-finite first line: the next counts
        {"step": 10, "samples": 640, "loss": first_loss},
        {"step": 20, "samples": 1280, "loss": 1.0},
    ]
    if final_eval is not None or first_loss == 0.5:  # (0.5: a run with an eval loss of null)
        lines.append({"step": 20, "samples": 1280, "eval_loss": final_eval, "eval_samples": 9})
    return [*lines, *extra]


@pytest.mark.parametrize(
    ("records", "why"),
    [
        (_run(2.3, 0.3), None),
        (_run(-1.0, -2.0), None),  # a loss below 0 (a log-density): 1% of its size
        (_run(2.3, 2.27), None),  # 1.3% below: learned, by the margin
        (_run(2.3, 2.28), "did not learn: its final eval loss 2.28 is not 1% or more below"),
        (_run(2.3, 2.31), "(2.3 at step 10)"),  # the first finite logged loss
        (_run(0.5, None), "the run diverged: its eval loss at step 20 is not finite"),
        (_run(2.3, None), "the run has no evaluation to tell whether it learned"),
        (_run(None, 0.3)[1:], None),  # the first finite loss is 1.0 at step 20
        (
            [{"step": 10, "loss": None}, {"step": 10, "eval_loss": 0.3}],
            "the run logged no finite training loss",
        ),
        (
            _run(2.3, 0.3, {"event": "diverged", "step": 63, "samples": 4032, "why": "loss 6e6"}),
            "the run diverged at step 63: loss 6e6",
        ),
        (_run(2.3, 0.3, {"event": "diverged"}), "the run diverged at an unnamed step"),
    ],
)
def test_whether_a_run_learned(records, why) -> None:
    got = why_not_learned(records)
    assert got == why if why is None else why in got


def test_a_run_that_did_not_learn_gets_no_advice(tmp_path) -> None:
    """The records carry a noise scale and the timings (advise gives advice), but the run's
    eval loss did not fall: no advice, the reason instead."""
    records = _timed(0.0)
    assert advise(records, NOW) is not None
    learned = [*records, {"step": 400, "samples": 25600, "eval_loss": 0.5}]
    advice, why = advice_or_why(tmp_path, learned, NOW, None)
    assert advice is not None and advice.recommended == 256 and why == ""
    stalled = [*records, {"step": 400, "samples": 25600, "eval_loss": 2.0}]  # started at 1.975
    advice, why = advice_or_why(tmp_path, stalled, NOW, None)
    assert advice is None
    assert why.startswith("the run did not learn: its final eval loss 2 is not 1% or more")
    diverged = [*learned, {"event": "diverged", "step": 300, "samples": 19200, "why": "x"}]
    assert advice_or_why(tmp_path, diverged, NOW, None)[1].startswith("the run diverged at step")
    unmeasured = [{k: v for k, v in r.items() if not k.startswith("grad")} for r in learned]
    advice, why = advice_or_why(tmp_path, unmeasured, NOW | {"noise": "off"}, None)
    assert (
        advice is None and why == "the noise scale was not measured; see the plan's noise_scale row"
    )

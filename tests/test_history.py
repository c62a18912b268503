"""What a run's advice tells about its history (launcher/batchsize/history.py): ramp decisions, loss
spikes (and what is not one), the critical batch over training against advice.critical_batch,
branched probes found in the run folder, and the next-run sentence (advice.next_run)."""

from __future__ import annotations

import json
import math

import pytest

from launcher.batchsize.advice import Advice, critical_batch, next_run
from launcher.batchsize.history import format_history, noise_over_training, probes, spikes


def _line(step: int, loss: float, **kw) -> dict:
    return {"step": step, "samples": 32 * step, "loss": loss, "global_batch": 32, **kw}


def test_a_spike_is_far_above_the_recent_median_and_its_spread() -> None:
    calm = [_line(s, 1.0 + 0.01 * (s % 3)) for s in range(1, 31)]
    assert spikes(calm) == []
    jumpy = [_line(s, 0.01 if s % 2 else 0.025) for s in range(1, 31)]  # late training: 2.5x
    assert spikes(jumpy) == []  # step to step, not a spike: the spread covers it
    blown = [*calm[:25], _line(26, 5.0), _line(27, math.nan), *calm[27:]]
    found = spikes(blown)
    assert [s for s, _, _ in found] == [26, 27]
    assert found[0][1:] == (5.0, pytest.approx(1.01))
    text = "\n".join(format_history(blown, []))
    assert "loss spikes: 2 log line(s)" in text and "step 26: 5 vs 1.01" in text


def test_noise_over_training_is_the_running_critical_batch() -> None:
    lines = [
        _line(s, 1.0, grad_sq=1.0 / s, grad_trace=10.0 * s, noise_scale=10.0 * s * s)
        for s in range(1, 9)
    ]
    lines[3] = _line(4, 1.0)  # a line without an estimate
    got = noise_over_training(lines, 32)
    assert [x for x, _, _ in got] == [32 * s for s in (1, 2, 3, 5, 6, 7, 8)]
    for n, (_, phi, crit) in zip((1, 2, 3, 5, 6, 7, 8), got, strict=True):
        assert phi == 10.0 * n * n
        assert crit == pytest.approx(critical_batch(lines[:n], 32)[0], rel=1e-12)


def test_ramp_decisions_and_probes_are_told(tmp_path) -> None:
    records = [
        {"event": "ramp", "step": 100, "samples": 3200, "global_batch": 64, "was": 32}
        | {"noise_scale": 70.2},
        {"event": "ramp", "step": 10, "global_batch": 32},  # a fixed ramp-up stage
    ]
    probe = {"step": 40, "consumed_samples": 1280, "global_batch": 32, "critical_batch": 256}
    probe |= {"tolerance": 0.05, "interpolated": 330.4}
    (tmp_path / "cbs-step40").mkdir()
    (tmp_path / "cbs-step40" / "cbs.json").write_text(json.dumps(probe))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cbs.json").write_text("{not json")  # left out, and said
    (tmp_path / "k2").mkdir()
    (tmp_path / "k2" / "cbs.json").write_text(json.dumps(probe | {"step": "40"}))
    left: list[str] = []
    found = probes(tmp_path, left)
    assert found == [probe]
    assert left == [
        f"{tmp_path / 'k2' / 'cbs.json'} (step='40': not a count)",
        f"{tmp_path / 'other' / 'cbs.json'} (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
    ]
    text = "\n".join(format_history(records, found))
    assert "ramp: global batch 32 -> 64 at step 100 (sample 3,200), measured noise scale 70" in text
    assert "ramp-up: global batch 32 from step 10" in text
    assert "branched probe at step 40 (1,280 samples): critical batch 256" in text
    assert "crossing at ~330" in text


def _advice(recommended: int, to_target=()) -> Advice:
    rows = tuple((b, b, 1.0, 1.0, 1.0) for b in (256, 512, 1024, 2048))
    return Advice(
        global_batch=512,
        world_size=2,
        noise_scale=400.0,
        phases=(),
        points=1,
        step_seconds=1.0,
        t_step=0.0,
        micro_seconds={},
        recommended=recommended,
        near=(recommended,),
        rows=rows,
        epochs=20.0,
        target="eval accuracy >= 0.95",
        to_target=to_target,
    )


def test_the_next_run_sentence() -> None:
    same = next_run(_advice(512), 0.48, "sgd, the linear rule", 128, 8)
    assert "global_batch=512 (as now): lr 0.48 (sgd, the linear rule" in same
    assert "256 samples each (accumulation 2 at the memory cap 128)" in same
    assert "4 devices = 1 node(s) of 8 would need none" in same
    bigger = next_run(_advice(2048, (10.0, 15.0, 22.0, 36.0)), 1.92, "sgd", 2048, None)
    assert "global_batch=2,048 instead of 512" in bigger
    assert "train >= 36 epochs to reach eval accuracy >= 0.95" in bigger
    assert "need none" not in bigger  # one device holds it


def test_flagged_steps_are_told() -> None:
    records = [
        {"event": "non_finite", "step": 3, "skipped": True},
        {"event": "loss_spike", "step": 25, "skipped": False},
        {"event": "loss_spike", "step": 40, "skipped": True},
    ]
    assert format_history(records, []) == [
        "  non-finite step(s): 1 at step(s) 3; 1 skipped (not learned from)",
        "  loss spike(s): 2 at step(s) 25, 40; 1 skipped (not learned from)",
    ]


def test_an_input_pipeline_that_does_not_keep_up_is_told() -> None:
    from launcher.batchsize.history import DATA_WAIT, format_history

    def told(waits):
        lines = format_history([{"step": i + 1, "data_wait": w} for i, w in enumerate(waits)], [])
        return [line for line in lines if "input pipeline" in line]

    assert told([0.9, 0.05, 0.02, 0.04]) == []  # a slow start only
    assert told([0.0, 0.5, 0.6]) == []  # too few intervals to say
    slow = told([0.9, 0.4, 0.5, 0.6, DATA_WAIT])
    assert len(slow) == 1 and "waited for its micro-batches 45% of" in slow[0], slow
    assert "median of 4 log intervals" in slow[0]

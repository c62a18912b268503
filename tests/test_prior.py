"""Does this run's budget suffice at its batch? The earlier run the plan finds (same recipe, model
and data; finished; with a noise scale), the samples it took to its target, and the empirical
model's arithmetic E_0 (B_crit + B) / (B_crit + B_0), against hand-computed numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from launcher.batchsize.advice import advise, format_advice, samples_to_match
from launcher.batchsize.prior import budget, find_prior, from_records
from launcher.config.schema import to_dict
from launcher.planning.plan import PlanInput, plan_batch
from launcher.planning.render import format_plan
from launcher.training.job_plan import with_budget
from tests.helpers import composed

NOISE = 400.0  # every line's tr(Sigma)/|G|^2: the run's critical batch is exactly this


def _records(batch: int, accuracies: list[float], final: bool = True) -> list[dict]:
    """Ten training lines over the run with a constant noise scale, then one evaluation per
    accuracy, one epoch of 32,000 samples apart; eval loss falls with the accuracy."""
    every = 32000 * len(accuracies) // batch // 10  # steps between training lines
    lines = [
        {"step": s, "samples": s * batch, "loss": 1.0, "global_batch": batch, "train_s": s * 0.01}
        | {"grad_sq": 1.0, "grad_trace": NOISE, "noise_scale": NOISE}
        for s in range(every, 11 * every, every)
    ]
    for epoch, accuracy in enumerate(accuracies, 1):
        samples = 32000 * epoch
        lines.append(
            {"step": samples // batch, "samples": samples}
            | {"eval_accuracy": accuracy, "eval_loss": 1 - accuracy}
        )
    return lines + ([{"final": True, "step": 10}] if final else [])


def _write_run(folder: Path, cfg, batch: int, records: list[dict], age: int = 0) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (folder / "plan.json").write_text(json.dumps({"global_batch": batch}))
    metrics = folder / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    stamp = 1_000_000 + age
    os.utime(metrics, (stamp, stamp))


def test_samples_to_match_is_the_empirical_models_ratio() -> None:
    # E = E_min (1 + B/Bc): 100k samples at 512 with Bc 400 -> E_min = 100k / 2.28
    assert samples_to_match(400, 512, 100_000, 4096) == pytest.approx(100_000 * 4496 / 912)
    assert samples_to_match(400, 512, 100_000, 512) == pytest.approx(100_000)


def test_budget_says_short_with_the_epochs_and_the_batch_that_fits() -> None:
    from launcher.batchsize.prior import Prior

    prior = Prior(Path("runs/a"), 512, 400.0, 96_000, "eval accuracy >= 0.95")
    need = 96_000 * (400 + 4096) / (400 + 512)  # 473,263 samples = 14.8 epochs of 32,000
    value, why = budget(prior, 4096, 320_000, 32_000)
    assert value == "SHORT"
    assert f"~{need:,.0f} samples = {need / 32000:.3g} epochs" in why
    largest = 320_000 * 912 / 96_000 - 400  # 2,640: the batch whose need is the budget
    assert f"use a global batch <= {largest:,.0f} at these epochs" in why
    assert samples_to_match(400, 512, 96_000, round(largest)) == pytest.approx(320_000, rel=1e-3)
    assert budget(prior, 2048, 320_000, 32_000)[0] == "enough"
    unreached = Prior(Path("runs/a"), 512, 400.0, None, "eval accuracy >= 0.95")
    assert budget(unreached, 4096, 320_000, 32_000)[0] == "?"


def test_the_target_is_the_first_evaluation_reaching_it_or_the_final_loss() -> None:
    records = _records(512, [0.90, 0.96, 0.97, 0.965])
    assert from_records(Path("r"), 512, records, 0.95).samples == 64_000
    assert from_records(Path("r"), 512, records, 0.99).samples is None
    # no target: the first evaluation as good as the final one (eval loss 0.035 at epoch 4)
    assert from_records(Path("r"), 512, records, None).samples == 96_000
    assert from_records(Path("r"), 512, records, None).noise == pytest.approx(NOISE)


def test_the_plan_finds_the_newest_finished_run_of_the_same_workload(tmp_path) -> None:
    cfg = composed(["+recipe=mnist1d", "target_accuracy=0.95"])
    other = composed(["+recipe=mnist1d", "model.channels=64"])  # another model: not a prior
    good = _records(512, [0.90, 0.96])
    _write_run(tmp_path / "old", cfg, 256, _records(256, [0.96]), age=0)
    _write_run(tmp_path / "new", cfg, 512, good, age=10)
    _write_run(tmp_path / "multirun-x" / "0", other, 512, good, age=20)
    _write_run(tmp_path / "unfinished", cfg, 512, _records(512, [0.96], final=False), age=30)
    slow = _records(512, [0.10, 0.10])  # eval loss 0.9, from a first loss of 1.0 ...
    _write_run(tmp_path / "slow", cfg, 512, slow, age=40)  # 10% below: it learned
    diverged = [*good[:-1], {"event": "diverged", "step": 9, "samples": 4608, "why": "x"}]
    _write_run(tmp_path / "diverged", cfg, 512, [*diverged, good[-1]], age=50)  # not a prior
    flat = [*good[:-3], {"step": 60, "samples": 30720, "eval_loss": 0.995}, good[-1]]
    _write_run(tmp_path / "flat", cfg, 512, flat, age=60)  # 0.5% below its first loss: not one
    prior = find_prior(cfg, tmp_path, exclude=tmp_path / "this")
    assert (prior.run_dir.name, prior.global_batch) == ("slow", 512)  # the newest that learned
    (tmp_path / "slow" / "metrics.jsonl").unlink()
    prior = find_prior(cfg, tmp_path, exclude=tmp_path / "this")
    assert (prior.run_dir.name, prior.global_batch, prior.samples) == ("new", 512, 64_000)
    assert find_prior(cfg, tmp_path, exclude=tmp_path / "new").run_dir.name == "old"

    plan = plan_batch(PlanInput(cfg, 1, 32_000))  # 20 epochs at 512 = 640,000 samples: enough
    assert with_budget(cfg, plan, tmp_path / "this").budget == "enough"
    big = plan_batch(PlanInput(composed(["+recipe=mnist1d", "global_batch=16384"]), 1, 32_000))
    short = with_budget(cfg, big, tmp_path / "this")  # 64k x 16784 / 912 = 1.18M samples
    assert short.budget == "SHORT" and "36.8 epochs" in short.reasons["budget"]
    assert "budget" in format_plan(short) and "budget" not in format_plan(big)
    assert with_budget(cfg, plan, tmp_path / "elsewhere" / "run").budget == "-"  # no prior


def test_the_advice_gives_every_batchs_epochs_to_the_target() -> None:
    records = _records(512, [0.90, 0.96] + [0.97] * 18)
    records.append({"step": 10, "micro_step_seconds": {"256": 1e-3, "512": 2e-3}})
    plan = {"global_batch": 512, "world_size": 1, "epoch_samples": 32_000}
    plan |= {"micro_batch": 512, "accumulation": 1}
    own = from_records(Path("r"), 512, records, 0.95)
    advice = advise(records, plan, (own.target, own.samples))
    by_batch = dict(zip((r[0] for r in advice.rows), advice.to_target, strict=True))
    assert by_batch[512] == pytest.approx(2.0)  # this run: 64,000 samples = 2 epochs
    assert by_batch[16384] == pytest.approx(2.0 * 16784 / 912)  # 36.8 epochs: SHORT of 20
    text = format_advice(advice)
    assert "36.8 SHORT" in text and "this run trained 20" in text
    assert advise(records, plan).to_target == ()  # no target: no column

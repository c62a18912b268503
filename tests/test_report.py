"""launcher.report: the critical-batch fit, the per-job numbers and recommendations on a
hand-written sweep with known answers, one real (tiny) sweep, and bad input."""

from __future__ import annotations

import errno
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.batchsize.advice import efficiency
from launcher.batchsize.plots import empty_panel
from launcher.batchsize.sweep import (
    SweepRun,
    fit_critical_batch,
    format_report,
    run_noise_scale,
    summarize_job,
    summarize_sweep,
)
from launcher.report import main
from tests.helpers import SMALL_DATA, read_metrics, run_cli, run_process, train_here

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCHES = [32 * 2**i for i in range(8)]  # 32 .. 4096


def report(args: list[str], cwd: Path):
    return run_process([sys.executable, "-m", "launcher.report", *args], cwd, timeout=120)


def report_here(args: list[str], cwd: Path, monkeypatch, capsys):
    """report() in this process (launcher.report.main); the real sweep's tests start it."""
    monkeypatch.chdir(cwd)
    code = main(args)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def table(markdown: str) -> list[dict[str, str]]:
    """The rows of report.md's table as {column: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


# ---------------------------------------------------------------------------------------------
# the fit


def test_fit_recovers_exact_critical_batch() -> None:
    steps = [183 * (1 + 444 / b) for b in BATCHES]
    s_min, b_crit = fit_critical_batch(BATCHES, steps)
    assert s_min == pytest.approx(183, rel=1e-3)
    assert b_crit == pytest.approx(444, rel=1e-3)
    two = fit_critical_batch([64, 128], [183 * (1 + 444 / 64), 183 * (1 + 444 / 128)])
    assert two == pytest.approx((183, 444), rel=1e-3)  # 2 points, 2 parameters: exact


def test_fit_with_multiplicative_noise() -> None:
    """5% lognormal noise on each of the 8 points: over seeds 0-199 the 95th percentile of the
    error is 6.5% on S_min and 11% on B_crit; seed 0 is off by 4.6% and 5.0%."""
    rng = np.random.default_rng(0)
    steps = [183 * (1 + 444 / b) * float(np.exp(rng.normal(0, 0.05))) for b in BATCHES]
    s_min, b_crit = fit_critical_batch(BATCHES, steps)
    assert s_min == pytest.approx(183, rel=0.1)
    assert b_crit == pytest.approx(444, rel=0.15)


def test_fit_refuses_fewer_than_two_batch_sizes() -> None:
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        fit_critical_batch([64], [100])
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        fit_critical_batch([64, 64], [100, 90])
    with pytest.raises(ValueError, match="must be > 0"):
        fit_critical_batch([64, 128], [100, 0])


# ---------------------------------------------------------------------------------------------
# per job


def test_noise_scale_is_the_runs_critical_batch() -> None:
    records = [
        {"step": 10, "loss": 1.0, "noise_scale": None},
        {"step": 20, "loss": 1.0, "grad_sq": 1.0, "grad_trace": 100.0},  # weight 1/(1 + 1)
        {"step": 30, "loss": 1.0, "grad_sq": 1.0, "grad_trace": 300.0},  # weight 1/4
        {"step": 30, "eval_accuracy": 0.5, "grad_sq": 1e-9, "grad_trace": 1.0},  # not training
    ]
    assert run_noise_scale(records, 100) == pytest.approx((50 + 75) / 0.75)  # not 200
    assert run_noise_scale(records[:1], 100) is None


def test_old_runs_without_train_s_or_noise_fields() -> None:
    plan = {"global_batch": 64, "optimizer": "sgd", "lr": 0.06}
    records = [
        {"step": 10, "samples": 640, "loss": 2.0, "lr": 0.06, "samples_per_s": 900.0},
        {"step": 10, "samples": 640, "eval_accuracy": 0.7, "eval_loss": 1.0},
        {"event": "checkpoint", "step": 20, "path": "x"},
        {"step": 20, "samples": 1280, "loss": 1.0, "lr": 0.06, "samples_per_s": 1000.0},
        {"step": 20, "samples": 1280, "eval_accuracy": 0.8, "eval_loss": 0.5},
    ]
    job = summarize_job("0", plan, records, target=0.75)
    assert (job.final_accuracy, job.steps_to_target, job.samples_to_target) == (0.8, 20, 1280)
    assert job.time_to_target is None and job.noise_scale is None
    assert job.samples_per_s == 1000.0  # the last logged one, without train_s
    assert not job.finished


def test_no_fit_and_no_recommendation_without_the_numbers() -> None:
    def job(batch: int, steps: int | None) -> SweepRun:
        return SweepRun(str(batch), batch, "sgd", 0.1, True, 0.9, steps, None, None, None, None)

    summary = summarize_sweep([job(64, 100), job(32, 150), job(128, None)], target=0.9)
    assert [j.global_batch for j in summary.jobs] == [32, 64, 128]
    assert summary.fit is not None
    summary = summarize_sweep([job(64, 100), job(64, 90), job(128, None)], target=0.9)
    assert summary.fit is None
    assert summary.fit_note == "no fit: fewer than 2 batch sizes reached the target"
    assert summary.fastest is None and summary.best_goodput is None


# ---------------------------------------------------------------------------------------------
# a hand-written sweep with known answers

S_MIN, B_CRIT = 100, 128  # steps to target: 500, 300, 200, 150
THROUGHPUT = {32: 1000.0, 64: 1900.0, 128: 3400.0, 256: 5400.0}  # training samples/s
NOISE = {32: 48.0, 64: 60.0, 128: 68.0, 256: 80.0}  # each run's critical batch; median 64
TARGET = 0.9


def write_job(folder: Path, batch: int) -> None:
    """A run of `batch` whose first eval at or above TARGET is at S_MIN (1 + B_CRIT / B), with
    training throughput THROUGHPUT[batch] and noise scale NOISE[batch]."""
    folder.mkdir(parents=True)
    hit = round(S_MIN * (1 + B_CRIT / batch))
    last = hit + 50

    def at(step: int) -> dict:
        return {"step": step, "samples": step * batch, "train_s": step * batch / THROUGHPUT[batch]}

    noise = NOISE[batch]
    records = [
        {**at(10), "loss": 2.0, "samples_per_s": 1.0, "noise_scale": None, "grad_sq": None},
        {**at(20), "loss": 1.5, "samples_per_s": 1.0, "grad_sq": 2.0, "grad_trace": 2 * noise},
        {**at(30), "loss": 1.4, "samples_per_s": 1.0, "grad_sq": 1.0, "grad_trace": noise},
        {**at(hit // 2), "eval_accuracy": 0.5, "eval_loss": 1.0, "eval_samples": 400},
        {"event": "checkpoint", "step": hit // 2, "path": "checkpoints/x.pt"},
        {**at(hit), "eval_accuracy": TARGET + 0.01, "eval_loss": 0.3, "eval_samples": 400},
        {**at(hit + 1), "eval_accuracy": TARGET - 0.01, "eval_loss": 0.4, "eval_samples": 400},
        {**at(last), "loss": 0.2, "samples_per_s": 1.0},
        {**at(last), "eval_accuracy": 0.93, "eval_loss": 0.2, "eval_samples": 400},
        {"final": True, "step": last, "param_digest": 1.0},
    ]
    plan = {"global_batch": batch, "optimizer": "sgd", "lr": 0.001 * batch, "steps": last}
    plan |= {"world_size": 1, "micro_batch": batch, "accumulation": 1, "epoch_samples": 10**5}
    (folder / "plan.json").write_text(json.dumps(plan))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_of_a_synthetic_sweep(tmp_path: Path, monkeypatch, capsys) -> None:
    sweep = tmp_path / "sweep"
    for name, batch in zip("2031", (32, 64, 128, 256), strict=True):  # folders not in B order
        write_job(sweep / name, batch)
    (sweep / "notes").mkdir()  # not a job
    (sweep / "0" / "checkpoints").mkdir()
    res = report_here([str(sweep), "--target", str(TARGET)], tmp_path, monkeypatch, capsys)
    assert res.returncode == 0, res.stderr
    markdown = (sweep / "report.md").read_text()
    assert markdown in res.stdout and str(sweep / "report.png") in res.stdout
    assert (sweep / "report.png").read_bytes()[:8] == PNG_MAGIC

    rows = table(markdown)
    assert [r["B"] for r in rows] == ["32", "64", "128", "256"]
    assert [r["job"] for r in rows] == ["2", "0", "3", "1"]
    assert [r["steps to target"] for r in rows] == ["500", "300", "200", "150"]
    assert [r["samples to target"] for r in rows] == ["16,000", "19,200", "25,600", "38,400"]
    assert [r["time to target (s)"] for r in rows] == ["16.00", "10.11", "7.53", "7.11"]
    assert [r["samples/s"] for r in rows] == ["1,000", "1,900", "3,400", "5,400"]
    assert [r["noise scale"] for r in rows] == ["48.0", "60.0", "68.0", "80.0"]
    assert [r["final acc"] for r in rows] == ["0.9300"] * 4
    phi = statistics.median(NOISE.values())
    goodput = {b: t * efficiency(b, phi, 32) for b, t in THROUGHPUT.items()}
    assert goodput[128] == max(goodput.values()) and goodput[256] < goodput[128]
    assert [r["goodput"] for r in rows] == [f"{g:,.0f}" for g in goodput.values()]

    assert "S_min = 100.0 steps, B_crit = 128, E_min = S_min x B_crit = 12,800 samples" in markdown
    assert "median 64.0 (range 48.0 to 80.0 over 4 runs)" in markdown
    assert "Fastest to target (measured): B = 256, 7.11 s of training." in markdown  # not goodput
    assert (
        "Goodput-optimal batch (Pollux, Qiao et al. OSDI'21): B = 128, goodput 1,700 =" in markdown
    )


def test_report_out_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    for name, batch in (("0", 32), ("1", 64)):
        write_job(tmp_path / "sweep" / name, batch)
    args = ["sweep", "--target", "0.95", "--out", "elsewhere/r"]
    res = report_here(args, tmp_path, monkeypatch, capsys)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "sweep" / "report.md").exists()
    markdown = (tmp_path / "elsewhere" / "r" / "report.md").read_text()
    assert "no fit: fewer than 2 batch sizes reached the target" in markdown  # nobody at 0.95
    assert (tmp_path / "elsewhere" / "r" / "report.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing"], "'missing': no such directory"),
        (["empty"], "'empty': neither a run (no plan.json) nor a sweep (no job folders"),
        (["sweep/0"], "'sweep/0': no batch-size advice: too few steps measured for the noise"),
        (["sweep", "--target", "1.5"], "--target=1.5: must be in (0, 1)"),
        (["sweep", "--target", "0"], "--target=0.0: must be in (0, 1)"),
        (["sweep", "--target", "high"], "invalid float value"),
        ([], "required: sweep_dir"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str, monkeypatch, capsys
) -> None:
    (tmp_path / "empty" / "not-a-job").mkdir(parents=True)
    write_job(tmp_path / "sweep" / "0", 64)
    res = report_here(args, tmp_path, monkeypatch, capsys)
    assert res.returncode == 2
    assert res.stderr.startswith("launcher.report: error: ") and message in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("report.*"))


def test_corrupt_metrics_is_bad_input(tmp_path: Path, monkeypatch, capsys) -> None:
    write_job(tmp_path / "sweep" / "0", 64)
    with open(tmp_path / "sweep" / "0" / "metrics.jsonl", "a") as f:
        f.write('{"step": 1\n{"step": 2, "loss"')  # a broken line, then a half-written last one
    res = report_here(["sweep"], tmp_path, monkeypatch, capsys)
    assert res.returncode == 2 and "metrics.jsonl' line 11: not a metrics record" in res.stderr


# ---------------------------------------------------------------------------------------------
# a real sweep


@pytest.mark.slow
def test_report_of_a_real_sweep(tmp_path: Path, data_cache: str) -> None:
    res = run_cli(
        [
            "-m",
            "+recipe=mnist1d",
            "global_batch=32,64",
            *SMALL_DATA,
            f"data.cache_dir={data_cache}",
            "trainer.epochs=2",
            "trainer.eval_every_epochs=0.5",
            "trainer.progress=false",
            "trainer.tensorboard=false",
            "run_dir=sweep",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    target = 0.12  # above chance (0.1); these 2-epoch runs end near 0.2
    res = report(["sweep", "--target", str(target)], tmp_path)
    assert res.returncode == 0, res.stderr
    rows = table((tmp_path / "sweep" / "report.md").read_text())
    assert [(r["job"], r["B"]) for r in rows] == [("0", "32"), ("1", "64")]
    for row in rows:
        records = read_metrics(tmp_path / "sweep" / row["job"])
        evals = [m for m in records if "eval_accuracy" in m]
        assert row["final acc"] == f"{evals[-1]['eval_accuracy']:.4f}"
        hit = next((m for m in evals if m["eval_accuracy"] >= target), None)
        bound = "<= " if hit is evals[0] else ""  # at the first evaluation: an upper bound
        assert row["steps to target"] == (f"{bound}{hit['step']:,}" if hit else "-")
        assert row["time to target (s)"] == (f"{bound}{hit['train_s']:,.2f}" if hit else "-")
        end = [m for m in records if "train_s" in m][-1]
        assert row["samples/s"] == f"{end['samples'] / end['train_s']:,.0f}"
        noise = run_noise_scale(records, int(row["B"]))  # measured: the noise meter is on
        assert row["noise scale"] == ("-" if noise is None else f"{noise:,.1f}")
    assert (tmp_path / "sweep" / "report.png").read_bytes()[:8] == PNG_MAGIC
    one = report(["sweep/1"], tmp_path)  # one run's folder: the advice it printed at its end
    assert one.returncode == 0, one.stderr
    assert "recommended global batch:" in one.stdout and "(now 64)" in one.stdout
    assert "next: train at global_batch=" in one.stdout  # the plain sentence
    assert (tmp_path / "sweep" / "1" / "training.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_a_real_run_that_does_not_learn_gets_no_advice(tmp_path: Path, data_cache: str) -> None:
    """lr 1e-9: the loss stays at its start (2.30 on 10 classes): the end of the run and
    launcher.report say why there is no batch-size advice, instead of recommending a batch.
    (test_report_of_a_real_sweep: the same tiny runs at their own lr get advice.)"""
    args = [*SMALL_DATA, f"data.cache_dir={data_cache}", "global_batch=64", "trainer.epochs=2"]
    args += ["optim.base_lr=1e-9", "trainer.progress=false", "trainer.tensorboard=false"]
    res = train_here([*args, "run_dir=run"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    said = res.stdout + res.stderr
    assert "batch-size advice: none (the run did not learn: its final eval loss" in said
    assert "recommended global batch" not in said and "next: train at" not in said
    one = report(["run"], tmp_path)
    assert one.returncode == 2 and one.stderr.count("\n") == 1, one.stderr
    assert "'run': no batch-size advice: the run did not learn: its final eval loss" in one.stderr
    assert not (tmp_path / "run" / "training.png").exists()


def test_several_runs_per_batch_count_by_their_median() -> None:
    """A sweep over seeds too: the fastest batch has the least median time to target, a run
    that missed the target counting as never; goodput likewise by its median."""

    def job(batch: int, seconds: float | None, speed: float) -> SweepRun:
        steps = None if seconds is None else 100
        return SweepRun(
            f"{batch}-{seconds}", batch, "sgd", 0.1, True, 0.9, steps, None, seconds, speed, 50.0
        )

    jobs = [job(64, 5.0, 100.0), job(64, 9.0, 100.0), job(128, 6.0, 400.0), job(128, None, 10.0)]
    summary = summarize_sweep(jobs, target=0.9)
    assert summary.fastest == (64, 7.0, 2)  # 128: median of 6 and never
    eff = efficiency(128, 50.0, 64)
    assert summary.best_goodput == (128, pytest.approx((400.0 + 10.0) / 2 * eff), 2)


def test_the_fit_takes_one_optimizers_runs() -> None:
    """A sweep across the recipe's large-batch swap: S = S_min (1 + B_crit/B) is fitted to the
    optimizer with the most batch sizes; the others are named, not mixed in."""

    def job(batch: int, optimizer: str, steps: float) -> SweepRun:
        return SweepRun(
            str(batch), batch, optimizer, 0.1, True, 0.9, round(steps), None, 1.0, 1.0, 9.0
        )

    sgd = [job(b, "sgd", 100 * (1 + 128 / b)) for b in (32, 64, 128, 256)]
    lamb = [job(b, "lamb", 20 * (1 + 4096 / b)) for b in (1024, 2048)]
    summary = summarize_sweep(sgd + lamb, target=0.9)
    assert summary.fit == (pytest.approx(100, rel=1e-2), pytest.approx(128, rel=1e-2))
    assert summary.fit_runs == 4
    assert summary.fit_note.startswith("sgd runs only: the model holds for one training setup")
    assert "the lamb runs (B 1,024-2,048) follow their own curve" in summary.fit_note


# ---------------------------------------------------------------------------------------------
# a fit of nothing gets no number (issue 30)


def _job(batch: int, steps: int | None, *, first: bool = False, opt: str = "sgd") -> SweepRun:
    """A run at `batch` that reached the target after `steps` (at its first evaluation: only an
    upper bound)."""
    return SweepRun(
        f"{batch}-{steps}", batch, opt, 0.1, True, 0.96, steps, None, 1.0, 1.0, 50.0, first
    )


@pytest.mark.parametrize(
    ("jobs", "note"),
    [
        (  # every run reached it at its first evaluation: the report of issue 30
            [_job(b, 32000 // b, first=True) for b in (32, 64, 128, 256, 512)],
            "no fit: 5 of the 5 runs that reached the target did so at their first evaluation, "
            "so their steps to it are only upper bounds",
        ),
        (  # one resolved batch is left: too few
            [_job(32, 400), _job(64, 250, first=True), _job(128, 125, first=True)],
            "no fit: 2 of the 3 runs that reached the target did so at their first evaluation",
        ),
        (
            [_job(32, 100), _job(64, 120), _job(128, 150)],
            "no fit: the steps to target do not fall as the batch grows (100 steps at B = 32, "
            "150 at B = 128)",
        ),
        (
            [_job(32, 400), _job(64, 200), _job(128, 100)],
            "no fit: the samples to target do not grow with the batch (400 steps at B = 32, 100 "
            "at B = 128): every batch is below the critical batch, and nothing here bounds it",
        ),
        (  # samples grow by 0.04%: B_crit far beyond the largest batch, at the search's edge
            [_job(32, 10000), _job(64, 5000), _job(128, 2501)],
            "no fit: the fitted B_crit runs to the edge of its search range",
        ),
        ([_job(64, 100)], "no fit: fewer than 2 batch sizes reached the target"),
    ],
)
def test_no_fit_from_steps_that_do_not_determine_it(jobs: list[SweepRun], note: str) -> None:
    summary = summarize_sweep(jobs, target=0.9)
    assert summary.fit is None and summary.fit_runs == 0
    assert summary.fit_note.startswith(note), summary.fit_note
    text = format_report(summary, "s")
    assert "S_min =" not in text and "B_crit =" not in text
    assert f"- Fit S = S_min (1 + B_crit / B): {summary.fit_note}." in text


def test_upper_bounds_are_left_out_of_a_fit_and_marked() -> None:
    exact = [_job(b, round(100 * (1 + 128 / b))) for b in (32, 64, 128)]
    summary = summarize_sweep([*exact, _job(256, 20, first=True)], target=0.9)
    assert summary.fit == (pytest.approx(100, rel=1e-2), pytest.approx(128, rel=1e-2))
    assert summary.fit_runs == 3
    assert "1 run(s) that reached the target at their first evaluation left out" in (
        summary.fit_note
    )
    two = summarize_sweep(exact[:2], target=0.9)
    assert "2 batch sizes: the curve passes through both, nothing tests it" in two.fit_note
    text = format_report(summary, "s")
    assert "| <= 20 |" in text and "<= : the target was reached at the run's first" in text
    assert summary.fastest is None and summary.bounded == 1
    assert "- Fastest to target: not determined (1 run(s) reached it at their first" in text


def test_runs_that_did_not_learn_are_left_out(tmp_path: Path) -> None:
    """A sweep job that diverged and one that did not learn are in the table, marked, and left
    out of the fit, the noise scale and both recommendations, with the reason."""
    sweep = tmp_path / "sweep"
    for name, batch in zip("0123", (32, 64, 128, 256), strict=True):
        write_job(sweep / name, batch)
    with open(sweep / "1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "diverged", "step": 99, "samples": 6336, "why": "x"}) + "\n")
    lines = (sweep / "3" / "metrics.jsonl").read_text().splitlines()
    lines[-2] = json.dumps({**json.loads(lines[-2]), "eval_loss": 2.5})  # above the first loss
    (sweep / "3" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main([str(sweep), "--target", str(TARGET)]) == 0
    markdown = (sweep / "report.md").read_text()
    rows = table(markdown)
    assert [r["job"] for r in rows] == ["0", "1 (left out)", "2", "3 (left out)"]
    assert [r["goodput"] for r in rows][1::2] == ["-", "-"]
    assert "job 1 (B 64): the run diverged at step 99: x." in markdown
    assert "job 3 (B 256): the run did not learn: its final eval loss 2.5 is not 1%" in markdown
    assert "the steps to target of 2 runs" in markdown  # 32 and 128
    assert "median 58.0 (range 48.0 to 68.0 over 2 runs)" in markdown
    assert "Fastest to target (measured): B = 128" in markdown


@pytest.mark.parametrize(
    ("field", "jobs", "label"),
    [
        ("steps_to_target", [_job(64, None)], "target 0.9 not reached"),
        ("time_to_target", [_job(64, None)], "target 0.9 not reached"),
        ("steps_to_target", [SweepRun("x", 64, "sgd", 0.1, False, *[None] * 6)], "not measured"),
        ("samples_per_s", [SweepRun("x", 64, "sgd", 0.1, False, *[None] * 6)], "not measured"),
    ],
)
def test_an_empty_panel_says_why(field: str, jobs: list[SweepRun], label: str) -> None:
    assert empty_panel(jobs, field, 0.9) == label


# ---------------------------------------------------------------------------------------------
# what is not a run or a sweep, malformed files, an unwritable --out: one line, nothing written


def _corrupt(folder: Path, what: str) -> None:
    run = folder / "sweep" / "0"
    edits = {
        "plan-garbage": lambda: (run / "plan.json").write_text("garbage"),
        "plan-types": lambda: (run / "plan.json").write_text('{"global_batch": 64, "steps": "x"}'),
        "plan-list": lambda: (run / "plan.json").write_text("[1, 2]"),
        "plan-bytes": lambda: (run / "plan.json").write_bytes(b"\xff\xfe{}"),
        "metrics-bytes": lambda: (run / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\n'),
        "metrics-types": lambda: (run / "metrics.jsonl").write_text('{"loss": "high"}\n'),
        "metrics-timing": lambda: (run / "metrics.jsonl").write_text(
            '{"micro_step_seconds": {"a": 1}}\n'
        ),
        "config-garbage": lambda: (run / "config.yaml").write_text(": ["),
    }
    if what.endswith("-dir"):
        name = what.removesuffix("-dir")
        (run / name).unlink()
        (run / name).mkdir()
    else:
        edits[what]()


@pytest.mark.parametrize(
    ("args", "what", "message"),
    [
        (["sweep/0"], "plan-garbage", "'sweep/0/plan.json': not a plan (Expecting value"),
        (["sweep"], "plan-types", "'sweep/0/plan.json': not a plan (steps='x': not a positive"),
        (["sweep"], "plan-list", "'sweep/0/plan.json': not a plan (not a JSON object)"),
        (["sweep/0"], "plan-bytes", "'sweep/0/plan.json': not a plan ('utf-8' codec can't"),
        (["sweep/0"], "plan.json-dir", "'sweep/0/plan.json': not a plan (Is a directory)"),
        (["sweep"], "metrics.jsonl-dir", "'sweep/0/metrics.jsonl': cannot read it (Is a dir"),
        (["sweep/0"], "metrics-bytes", "'sweep/0/metrics.jsonl': cannot read it ('utf-8'"),
        (["sweep"], "metrics-types", "metrics.jsonl' line 1: not a metrics record (loss='high'"),
        (["sweep/0"], "metrics-timing", "line 1: not a metrics record (micro_step_seconds: not"),
        (["sweep/0"], "config-garbage", "'sweep/0/config.yaml': not a run's config (while"),
        (["sweep/0"], "config.yaml-dir", "'sweep/0/config.yaml': not a run's config (Is a dir"),
        (["sweep/0", "--out", "/proc/x"], "", "--out='/proc/x': cannot write there"),
        (["sweep", "--out", "/proc/x"], "", "--out='/proc/x': cannot write there"),
        (["sweep", "--out", "sweep/0/plan.json"], "", "'sweep/0/plan.json': not a directory"),
        (["sweep/0/checkpoints"], "", "neither a run (no plan.json) nor a sweep (no job folders"),
        (["."], "", "'.': not one sweep: its job folders train different workloads (a: recipe"),
        (["empty-sweep"], "", "'empty-sweep': nothing to report yet: no job folder's metrics"),
    ],
)
def test_malformed_input_is_one_line_and_nothing_written(
    tmp_path: Path, monkeypatch, capsys, args: list[str], what: str, message: str
) -> None:
    """In process (launcher.report.main): exit 2, one line on stderr, no file added or changed."""
    write_job(tmp_path / "sweep" / "0", 64)
    write_job(tmp_path / "sweep" / "1", 128)
    timing = {"step": 1, "micro_step_seconds": {"32": 0.01, "64": 0.02}}
    with open(tmp_path / "sweep" / "0" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(timing) + "\n")  # the run's advice can be given
    (tmp_path / "sweep" / "0" / "checkpoints").mkdir()
    for name, recipe in (("0", "mnist1d"), ("1", "mnist1d")):
        (tmp_path / "sweep" / name / "config.yaml").write_text(f"recipe: {recipe}\n")
    for name, recipe in (("a", "mnist1d"), ("b", "gpt_small")):  # "." holds two workloads
        write_job(tmp_path / name, 64)
        (tmp_path / name / "config.yaml").write_text(f"recipe: {recipe}\n")
    (tmp_path / "empty-sweep" / "0").mkdir(parents=True)
    (tmp_path / "empty-sweep" / "0" / "plan.json").write_text('{"global_batch": 8}')
    (tmp_path / "empty-sweep" / "0" / "metrics.jsonl").write_text("")
    if what:
        _corrupt(tmp_path, what)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launcher.report: error: "), err
    assert message in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_failed_write_is_exit_5_and_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """A disk that fills up while report.png is drawn: one line naming it, exit 5 (WriteFailed),
    neither report.md nor a temporary file left."""
    write_job(tmp_path / "sweep" / "0", 64)

    def full(summary, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("launcher.report.plot_report", full)
    assert main([str(tmp_path / "sweep")]) == 5
    err = capsys.readouterr().err
    assert err == (
        f"launcher.report: error: cannot write report.png {tmp_path / 'sweep' / 'report.png'} "
        "(No space left on device)\n"
    )
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0"]
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "new" / "out")]) == 5
    assert not (tmp_path / "new").exists()  # the folders it made for --out are gone too

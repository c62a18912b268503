"""A sweep's job folders read and summarised: per-job numbers, the critical-batch fit
(McCandlish et al. 2018, eq. 2.11), the fastest and the goodput-optimal batch (Pollux), the
report table and plots. `python -m launcher.report` (launcher/report.py) is the command;
the method is described there."""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.batchsize.advice import critical_batch, efficiency
from launcher.batchsize.fit import edge_problem, fit_critical_batch, fit_problem
from launcher.batchsize.outcome import why_not_learned
from launcher.batchsize.records import plan_problem, record_problem
from launcher.errors import ConfigError


@dataclass(frozen=True)
class SweepRun:
    """One run of the sweep, reduced to the numbers the report shows (None: not measured)."""

    name: str
    global_batch: int
    optimizer: str
    lr: float | None
    finished: bool  # the run wrote its final record
    final_accuracy: float | None
    steps_to_target: int | None
    samples_to_target: int | None
    time_to_target: float | None
    samples_per_s: float | None
    noise_scale: float | None
    upper_bound: bool = False  # the target was reached at the first evaluation: "<= steps"
    failed: str | None = None  # why the run did not learn (outcome.py); None: it did


@dataclass(frozen=True)
class Summary:
    """The sweep: its jobs (sorted by global batch), the fit and the two recommendations."""

    target: float
    jobs: list[SweepRun]
    fit: tuple[float, float] | None  # (S_min, B_crit)
    fit_note: str  # why there is no fit, or a caveat about it; "" when none
    fit_runs: int  # the runs the fit used (one optimizer's)
    noise_scale: float | None  # phi: the median of the jobs' noise scales
    goodput: list[float | None]  # per job, same order as jobs
    base_batch: int  # B_0: the smallest batch of the sweep
    fastest: tuple[int, float, int] | None  # (B, median time to target, runs at B)
    best_goodput: tuple[int, float, int] | None  # (B, median goodput, runs at B)
    left_out: tuple[SweepRun, ...] = ()  # runs that did not learn: in the table only
    bounded: int = 0  # runs that reached the target at their first evaluation (fastest: none)


# ---------------------------------------------------------------------------------------------
# reading


def find_jobs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders: subfolders of `sweep_dir` that hold plan.json and metrics.jsonl
    (whatever they are: read_job says what is wrong with one that is not a file)."""
    if not sweep_dir.is_dir():
        raise ConfigError(f"{str(sweep_dir)!r}: no such directory")
    try:
        jobs = [
            d
            for d in sweep_dir.iterdir()
            if d.is_dir() and (d / "plan.json").exists() and (d / "metrics.jsonl").exists()
        ]
    except OSError as exc:
        raise ConfigError(f"{str(sweep_dir)!r}: cannot list it ({exc.strerror})") from None
    if not jobs:
        raise ConfigError(
            f"{str(sweep_dir)!r}: neither a run (no plan.json) nor a sweep (no job folders: "
            "subfolders with plan.json and metrics.jsonl); give a run's folder or a sweep's, "
            "e.g. outputs/mnist1d/multirun-<stamp>"
        )
    return sorted(jobs, key=lambda d: name_key(d.name))


def read_job(job_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """plan.json and the records of metrics.jsonl. A last line without its newline (the run was
    killed while writing it) is dropped; any other unreadable line is an error."""
    try:
        plan = json.loads((job_dir / "plan.json").read_text())
        problem = plan_problem(plan)
        if problem:
            raise ValueError(problem)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{str(job_dir / 'plan.json')!r}: not a plan ({why})") from None
    path = job_dir / "metrics.jsonl"
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{str(path)!r}: cannot read it ({why})") from None
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            problem = record_problem(record)
            if problem:
                raise ValueError(problem)
        except ValueError as exc:
            raise ConfigError(
                f"{str(path)!r} line {number}: not a metrics record ({exc})"
            ) from None
        records.append(record)
    return plan, records


# ---------------------------------------------------------------------------------------------
# per job


def run_noise_scale(records: list[dict[str, Any]], batch: int) -> float | None:
    """The run's critical batch from its logged noise scale (advice.critical_batch), or None."""
    found = critical_batch([r for r in records if "loss" in r], batch)
    return found[0] if found else None


def summarize_job(
    name: str, plan: dict[str, Any], records: list[dict[str, Any]], target: float
) -> SweepRun:
    """Reduce one run (its plan and metrics records) to a row of the report."""
    batch = plan["global_batch"]
    evals = [r for r in records if r.get("eval_accuracy") is not None and "event" not in r]
    logs = [r for r in records if "loss" in r and "event" not in r]
    hit = next((r for r in evals if r["eval_accuracy"] >= target), None)
    timed = [r for r in records if r.get("train_s") and "event" not in r and "step" in r]
    if timed:
        end = timed[-1]
        throughput = end.get("samples", end["step"] * batch) / end["train_s"]
    else:
        throughput = next(
            (r["samples_per_s"] for r in reversed(logs) if r.get("samples_per_s")), None
        )
    return SweepRun(
        name=name,
        global_batch=batch,
        optimizer=str(plan.get("optimizer", "-")),
        lr=plan.get("lr"),
        finished=any(r.get("final") for r in records),
        final_accuracy=evals[-1]["eval_accuracy"] if evals else None,
        steps_to_target=hit["step"] if hit else None,
        samples_to_target=hit.get("samples", hit["step"] * batch) if hit else None,
        time_to_target=hit.get("train_s") if hit else None,
        samples_per_s=throughput,
        noise_scale=run_noise_scale(records, batch),
        upper_bound=hit is not None and hit is evals[0],
        failed=why_not_learned(records),
    )


# ---------------------------------------------------------------------------------------------
# over the sweep


def summarize_sweep(jobs: list[SweepRun], target: float) -> Summary:
    """Fit, noise scale, goodput and the two recommendations from the jobs (sorted here) that
    learned; the others are listed in `left_out`."""
    jobs = sorted(jobs, key=lambda j: (j.global_batch, name_key(j.name)))
    usable = [j for j in jobs if j.failed is None]
    fit, note, used = fit_sweep(usable)
    scales = [j.noise_scale for j in usable if j.noise_scale is not None]
    phi = statistics.median(scales) if scales else None
    base = jobs[0].global_batch
    goodput = [
        j.samples_per_s * efficiency(j.global_batch, phi, base)
        if phi is not None and j.samples_per_s is not None and j.failed is None
        else None
        for j in jobs
    ]
    times: dict[int, list[float]] = {}
    for j in usable:
        times.setdefault(j.global_batch, []).append(
            math.inf if j.time_to_target is None else j.time_to_target
        )
    medians = [(b, statistics.median(t), len(t)) for b, t in times.items()]
    finite = [m for m in medians if math.isfinite(m[1])]
    bounded = sum(1 for j in usable if j.upper_bound and j.time_to_target is not None)
    fastest = min(finite, key=lambda m: m[1]) if finite and not bounded else None
    rated: dict[int, list[float]] = {}
    for g, j in zip(goodput, jobs, strict=True):
        if g is not None:
            rated.setdefault(j.global_batch, []).append(g)
    by_batch = [(b, statistics.median(g), len(g)) for b, g in rated.items()]
    best = max(by_batch, key=lambda m: m[1]) if by_batch else None
    left_out = tuple(j for j in jobs if j.failed is not None)
    return Summary(
        target, jobs, fit, note, used, phi, goodput, base, fastest, best, left_out, bounded
    )


def fit_sweep(jobs: list[SweepRun]) -> tuple[tuple[float, float] | None, str, int]:
    """(the fit or None, why not or its caveats, the runs it used): S = S_min (1 + B_crit / B)
    over the runs whose steps to target were resolved (not at their first evaluation), of the
    optimizer with the most batch sizes (the smallest batches on a tie)."""
    reached = [j for j in jobs if j.steps_to_target is not None]
    resolved = [j for j in reached if not j.upper_bound]
    bounds = len(reached) - len(resolved)
    groups: dict[str, list[SweepRun]] = {}
    for j in resolved:
        groups.setdefault(j.optimizer, []).append(j)
    spans = {o: {j.global_batch for j in g} for o, g in groups.items()}
    fittable = [o for o in groups if len(spans[o]) >= 2]
    if not fittable:
        if bounds and len({j.global_batch for j in reached}) >= 2:
            return None, _bounds_note(bounds, len(reached)), 0
        note = "no fit: fewer than 2 batch sizes reached the target"
        return None, note + (" with one optimizer" if len(groups) > 1 else ""), 0
    optimizer = max(fittable, key=lambda o: (len(spans[o]), -min(spans[o])))
    used = groups[optimizer]
    batches = [j.global_batch for j in used]
    steps = [float(j.steps_to_target) for j in used if j.steps_to_target is not None]  # all
    problem = fit_problem(batches, steps)
    if problem is None:
        fit = fit_critical_batch(batches, steps)
        problem = edge_problem(batches, fit[1])
    if problem is not None:
        return None, f"no fit: {problem}", 0
    notes = []
    others = sorted({j.global_batch for j in resolved if j.optimizer != optimizer})
    if others:
        names = ", ".join(sorted(o for o in groups if o != optimizer))
        notes.append(
            f"{optimizer} runs only: the model holds for one training setup, and the "
            f"{names} runs (B {others[0]:,}-{others[-1]:,}) follow their own curve"
        )
    if len(spans[optimizer]) == 2:
        notes.append("2 batch sizes: the curve passes through both, nothing tests it")
    if bounds:
        notes.append(
            f"{bounds} run(s) that reached the target at their first evaluation left out: "
            "their steps are only an upper bound"
        )
    return fit, "; ".join(notes), len(used)


def _bounds_note(bounds: int, reached: int) -> str:
    return (
        f"no fit: {bounds} of the {reached} runs that reached the target did so at their first "
        "evaluation, so their steps to it are only upper bounds, and too few batch sizes are "
        "left; evaluate more often (trainer.eval_every_epochs) or set a higher --target"
    )


def name_key(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (sys.maxsize, name)


# ---------------------------------------------------------------------------------------------
# output


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


def _at_most(job: SweepRun) -> str:
    """The mark of a number to target that is only an upper bound."""
    return "<= " if job.upper_bound and job.steps_to_target is not None else ""


def format_report(summary: Summary, title: str) -> str:
    """The markdown report: the table and the fit, noise-scale and recommendation lines. (Over
    60 lines: the report's sections in the order they are printed.)"""
    head = (
        "job",
        "B",
        "optimizer",
        "lr",
        "final acc",
        "steps to target",
        "samples to target",
        "time to target (s)",
        "samples/s",
        "noise scale",
        "goodput",
    )
    at_most = _at_most
    rows = [
        (
            j.name + ("" if j.finished else " (unfinished)") + (" (left out)" * bool(j.failed)),
            f"{j.global_batch:,}",
            j.optimizer,
            _f(j.lr, ".4g"),
            _f(j.final_accuracy, ".4f"),
            at_most(j) + _f(j.steps_to_target, ","),
            at_most(j) + _f(j.samples_to_target, ","),
            at_most(j) + _f(j.time_to_target, ",.2f"),
            _f(j.samples_per_s, ",.0f"),
            _f(j.noise_scale, ",.1f"),
            _f(g, ",.0f"),
        )
        for j, g in zip(summary.jobs, summary.goodput, strict=True)
    ]
    lines = [f"# Sweep report: {title}", "", f"Target: eval accuracy >= {summary.target:g}.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    if any(j.upper_bound for j in summary.jobs):
        lines.append("<= : the target was reached at the run's first evaluation (an upper bound).")
        lines.append("")
    for j in summary.left_out:
        lines.append(
            f"- Left out of the fit, the noise scale and the recommendations: job {j.name} "
            f"(B {j.global_batch:,}): {j.failed}."
        )
    if summary.fit is None:
        lines.append(f"- Fit S = S_min (1 + B_crit / B): {summary.fit_note}.")
    else:
        s_min, b_crit = summary.fit
        lines.append(
            f"- Fit S = S_min (1 + B_crit / B) to the steps to target of {summary.fit_runs} runs "
            "that reached it (log-space least squares; McCandlish et al. 2018): "
            f"S_min = {s_min:,.1f} steps, B_crit = {b_crit:,.0f}, "
            f"E_min = S_min x B_crit = {s_min * b_crit:,.0f} samples"
            + (f" ({summary.fit_note})." if summary.fit_note else ".")
        )
    scales = [j.noise_scale for j in summary.jobs if j.noise_scale is not None and not j.failed]
    if summary.noise_scale is None:
        lines.append("- Measured noise scale: none (no run logged noise_scale).")
    else:
        lines.append(
            "- Measured noise scale (each run's B_simple = tr(Sigma)/|G|^2 averaged over the run "
            f"as its critical batch, launcher.batchsize.advice.critical_batch): median "
            f"{summary.noise_scale:,.1f} (range {min(scales):,.1f} to {max(scales):,.1f} over "
            f"{len(scales)} runs)."
        )
    if summary.bounded:
        lines.append(
            f"- Fastest to target: not determined ({summary.bounded} run(s) reached it at their "
            "first evaluation: their times to it are only upper bounds)."
        )
    elif summary.fastest is None:
        reached = any(j.steps_to_target is not None and not j.failed for j in summary.jobs)
        why = "no run that reached it logged train_s" if reached else "no run reached it"
        lines.append(f"- Fastest to target: none ({why}).")
    else:
        b, seconds, runs = summary.fastest
        over = f" (median of {runs} runs)" if runs > 1 else ""
        lines.append(
            f"- Fastest to target (measured): B = {b:,}, {seconds:,.2f} s of training{over}."
        )
    if summary.best_goodput is None:
        lines.append("- Goodput-optimal batch: none (needs a measured noise scale and samples/s).")
    else:
        b, value, runs = summary.best_goodput
        over = f" (median of {runs} runs)" if runs > 1 else ""
        lines.append(
            f"- Goodput-optimal batch (Pollux, Qiao et al. OSDI'21): B = {b:,}, goodput "
            f"{value:,.0f}{over} = samples/s x efficiency, efficiency(B) = (phi + B_0) / (phi + B) "
            f"with phi = {summary.noise_scale:,.1f} (the median noise scale) and "
            f"B_0 = {summary.base_batch:,}."
        )
    return "\n".join(lines) + "\n"

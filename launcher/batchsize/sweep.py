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

import numpy as np

from launcher.batchsize.advice import critical_batch, efficiency
from launcher.errors import ConfigError


@dataclass(frozen=True)
class Job:
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


@dataclass(frozen=True)
class Summary:
    """The sweep: its jobs (sorted by global batch), the fit and the two recommendations."""

    target: float
    jobs: list[Job]
    fit: tuple[float, float] | None  # (S_min, B_crit)
    fit_note: str  # why there is no fit, or a caveat about it; "" when none
    fit_runs: int  # the runs the fit used (one optimizer's)
    noise_scale: float | None  # phi: the median of the jobs' noise scales
    goodput: list[float | None]  # per job, same order as jobs
    base_batch: int  # B_0: the smallest batch of the sweep
    fastest: tuple[int, float, int] | None  # (B, median time to target, runs at B)
    best_goodput: tuple[int, float, int] | None  # (B, median goodput, runs at B)


# ---------------------------------------------------------------------------------------------
# reading


def find_jobs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders: subfolders of `sweep_dir` that hold plan.json and metrics.jsonl."""
    if not sweep_dir.is_dir():
        raise ConfigError(f"{str(sweep_dir)!r}: no such directory")
    jobs = [
        d
        for d in sweep_dir.iterdir()
        if d.is_dir() and (d / "plan.json").is_file() and (d / "metrics.jsonl").is_file()
    ]
    if not jobs:
        raise ConfigError(
            f"{str(sweep_dir)!r}: no job folders (subfolders with plan.json and metrics.jsonl); "
            "give the sweep's folder, e.g. outputs/mnist1d/multirun-<stamp>"
        )
    return jobs


def read_job(job_dir: Path) -> tuple[dict, list[dict]]:
    """plan.json and the records of metrics.jsonl. A last line without its newline (the run was
    killed while writing it) is dropped; any other unreadable line is an error."""
    try:
        plan = json.loads((job_dir / "plan.json").read_text())
        if not isinstance(plan, dict) or not isinstance(plan.get("global_batch"), int):
            raise ValueError("no integer global_batch")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(job_dir / 'plan.json')!r}: not a plan ({exc})") from None
    path = job_dir / "metrics.jsonl"
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r}: cannot read it ({exc})") from None
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
        except ValueError as exc:
            raise ConfigError(
                f"{str(path)!r} line {number}: not a metrics record ({exc})"
            ) from None
        records.append(record)
    return plan, records


# ---------------------------------------------------------------------------------------------
# per job


def run_noise_scale(records: list[dict], batch: int) -> float | None:
    """The run's critical batch from its logged noise scale (advice.critical_batch), or None."""
    found = critical_batch([r for r in records if "loss" in r], batch)
    return found[0] if found else None


def summarize_job(name: str, plan: dict, records: list[dict], target: float) -> Job:
    """Reduce one run (its plan and metrics records) to a row of the report."""
    batch = plan["global_batch"]
    evals = [r for r in records if "eval_accuracy" in r and "event" not in r]
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
    return Job(
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
    )


# ---------------------------------------------------------------------------------------------
# over the sweep


def fit_critical_batch(batches: list[float], steps: list[float]) -> tuple[float, float]:
    """Least-squares fit of S = S_min (1 + B_crit / B) in log space; returns (S_min, B_crit).

    Minimises sum_i (log S_i - log S_min - log(1 + B_crit / B_i))^2. For a fixed B_crit the best
    log S_min is the mean of the residuals log S_i - log(1 + B_crit / B_i), which leaves a 1-D
    problem in log B_crit: a grid over [min B / 100, max B x 100], then golden-section search
    between the neighbours of the best grid point. Needs 2 distinct batches (ValueError).
    """
    b = np.asarray(batches, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"fit_critical_batch: {b.shape} batches but {s.shape} steps")
    if np.any(b <= 0) or np.any(s <= 0):
        raise ValueError("fit_critical_batch: batches and steps must be > 0")
    if len(np.unique(b)) < 2:
        raise ValueError("fit_critical_batch: needs at least 2 distinct batch sizes")
    log_b, log_s = np.log(b), np.log(s)

    def residuals(log_b_crit: np.ndarray) -> np.ndarray:  # (..., n): log S_i - log(1 + Bc/B_i)
        return log_s - np.logaddexp(0.0, log_b_crit[..., None] - log_b)

    def loss(log_b_crit: np.ndarray) -> np.ndarray:
        r = residuals(log_b_crit)
        return np.sum((r - r.mean(axis=-1, keepdims=True)) ** 2, axis=-1)

    grid = np.linspace(log_b.min() - math.log(100), log_b.max() + math.log(100), 2001)
    i = int(np.argmin(loss(grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):  # the bracket shrinks by 0.618 a step: ~1e-21 of its width
        x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if loss(np.array(x1)) <= loss(np.array(x2)):
            hi = x2
        else:
            lo = x1
    log_b_crit = np.array((lo + hi) / 2)
    s_min = math.exp(float(residuals(log_b_crit).mean()))
    return s_min, math.exp(float(log_b_crit))


def summarize_sweep(jobs: list[Job], target: float) -> Summary:
    """Fit, noise scale, goodput and the two recommendations from the jobs (sorted here)."""
    jobs = sorted(jobs, key=lambda j: (j.global_batch, name_key(j.name)))
    reached = [j for j in jobs if j.steps_to_target is not None]
    groups: dict[str, list[Job]] = {}
    for j in reached:
        groups.setdefault(j.optimizer, []).append(j)
    spans = {o: {j.global_batch for j in g} for o, g in groups.items()}
    fittable = [o for o in groups if len(spans[o]) >= 2]
    fit, note, used = None, "", []
    if not fittable:
        note = "no fit: fewer than 2 batch sizes reached the target"
        note += " with one optimizer" if len(groups) > 1 else ""
    else:  # the optimizer with the most batch sizes (the smallest batches on a tie)
        optimizer = max(fittable, key=lambda o: (len(spans[o]), -min(spans[o])))
        used = groups[optimizer]
        batches = [j.global_batch for j in used]
        fit = fit_critical_batch(batches, [j.steps_to_target for j in used])
        others = sorted({j.global_batch for j in reached if j.optimizer != optimizer})
        notes = []
        if others:
            names = ", ".join(sorted(o for o in groups if o != optimizer))
            notes.append(
                f"{optimizer} runs only: the model holds for one training setup, and the "
                f"{names} runs (B {others[0]:,}-{others[-1]:,}) follow their own curve"
            )
        if not min(batches) / 99 < fit[1] < max(batches) * 99:
            notes.append("B_crit is at the edge of the search range: these runs do not pin it down")
        note = "; ".join(notes)
    scales = [j.noise_scale for j in jobs if j.noise_scale is not None]
    phi = statistics.median(scales) if scales else None
    base = jobs[0].global_batch
    goodput = [
        j.samples_per_s * efficiency(j.global_batch, phi, base)
        if phi is not None and j.samples_per_s is not None
        else None
        for j in jobs
    ]
    times = {}
    for j in jobs:
        times.setdefault(j.global_batch, []).append(
            math.inf if j.time_to_target is None else j.time_to_target
        )
    medians = [(b, statistics.median(t), len(t)) for b, t in times.items()]
    finite = [m for m in medians if math.isfinite(m[1])]
    fastest = min(finite, key=lambda m: m[1]) if finite else None
    rated: dict[int, list[float]] = {}
    for g, j in zip(goodput, jobs, strict=True):
        if g is not None:
            rated.setdefault(j.global_batch, []).append(g)
    by_batch = [(b, statistics.median(g), len(g)) for b, g in rated.items()]
    best = max(by_batch, key=lambda m: m[1]) if by_batch else None
    return Summary(target, jobs, fit, note, len(used), phi, goodput, base, fastest, best)


def name_key(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (sys.maxsize, name)


# ---------------------------------------------------------------------------------------------
# output


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


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
    rows = [
        (
            j.name + ("" if j.finished else " (unfinished)"),
            f"{j.global_batch:,}",
            j.optimizer,
            _f(j.lr, ".4g"),
            _f(j.final_accuracy, ".4f"),
            _f(j.steps_to_target, ","),
            _f(j.samples_to_target, ","),
            _f(j.time_to_target, ",.2f"),
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
    scales = [j.noise_scale for j in summary.jobs if j.noise_scale is not None]
    if summary.noise_scale is None:
        lines.append("- Measured noise scale: none (no run logged noise_scale).")
    else:
        lines.append(
            "- Measured noise scale (each run's B_simple = tr(Sigma)/|G|^2 averaged over the run "
            f"as its critical batch, launcher.batchsize.advice.critical_batch): median "
            f"{summary.noise_scale:,.1f} (range {min(scales):,.1f} to {max(scales):,.1f} over "
            f"{len(scales)} runs)."
        )
    if summary.fastest is None:
        lines.append("- Fastest to target: none (no run reached it with train_s logged).")
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


def plot_report(summary: Summary, path: Path) -> None:
    """report.png: final accuracy, time to target, steps to target (with the fit, B_crit and the
    measured noise scale) and samples/s, each against the global batch on a log2 axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panels = (
        ("final eval accuracy", "final_accuracy", False),
        (f"time to accuracy {summary.target:g} (s)", "time_to_target", True),
        (f"steps to accuracy {summary.target:g}", "steps_to_target", True),
        ("training samples/s", "samples_per_s", True),
    )
    marks = [j.global_batch for j in summary.jobs]  # the x range: every batch and every line
    marks += [summary.fit[1]] if summary.fit else []
    marks += [summary.noise_scale] if summary.noise_scale else []
    x_range = (min(marks) / 1.5, max(marks) * 1.5)
    plain = FuncFormatter(lambda x, _: f"{x:,.4g}")
    for ax, (label, field, log_y) in zip(axes.flat, panels, strict=True):
        points = [(j.global_batch, getattr(j, field)) for j in summary.jobs]
        points = [(b, v) for b, v in points if v is not None]
        ax.set_xscale("log", base=2)
        ax.set_xlim(*x_range)
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel("global batch B")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
            continue
        by_batch: dict[int, list[float]] = {}
        for b, v in points:
            by_batch.setdefault(b, []).append(v)
        medians = [(b, statistics.median(v)) for b, v in sorted(by_batch.items())]
        several = any(len(v) > 1 for v in by_batch.values())
        ax.plot(*zip(*medians, strict=True), "o-", label="measured" + (" (median)" * several))
        if several:
            ax.plot(*zip(*points, strict=True), ".", color="C0", alpha=0.35, label="each run")
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    ax = axes.flat[2]
    if summary.fit is not None:
        s_min, b_crit = summary.fit
        b = np.geomspace(*x_range, 200)
        ax.plot(b, s_min * (1 + b_crit / b), "-", alpha=0.7, label="S_min (1 + B_crit / B)")
        ax.axvline(b_crit, color="C2", label=f"B_crit (fit) = {b_crit:,.0f}")
    if summary.noise_scale is not None:
        phi = summary.noise_scale
        ax.axvline(phi, color="C3", ls="--", label=f"noise scale (measured) = {phi:,.0f}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.suptitle(f"batch-size sweep, target accuracy {summary.target:g}")
    fig.savefig(path, dpi=100)
    plt.close(fig)

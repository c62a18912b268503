"""The report's plots: report.png of a sweep (sweep.py's Summary) and training.png of one run
(history.py's series). Drawn with matplotlib's Agg backend; nothing else here."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from launcher.batchsize.history import batch_over_samples, noise_over_training
from launcher.batchsize.sweep import Summary, SweepRun


def empty_panel(jobs: list[SweepRun], field: str, target: float) -> str:
    """What a plot panel with no point says: the target not reached (the runs evaluated, none got
    there), or not measured."""
    to_target = field in ("time_to_target", "steps_to_target")
    evaluated = any(j.final_accuracy is not None for j in jobs)
    if to_target and evaluated and not any(j.steps_to_target is not None for j in jobs):
        return f"target {target:g} not reached"
    return "not measured"


def plot_report(summary: Summary, path: Path) -> None:
    """report.png: final accuracy, time to target, steps to target (with the fit, B_crit and the
    measured noise scale) and samples/s of the runs that learned, each against the global batch
    on a log2 axis."""
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
    # the x range: every batch and every line
    marks: list[float] = [j.global_batch for j in summary.jobs]
    marks += [summary.fit[1]] if summary.fit else []
    marks += [summary.noise_scale] if summary.noise_scale else []
    x_range = (min(marks) / 1.5, max(marks) * 1.5)
    plain = FuncFormatter(lambda x, _: f"{x:,.4g}")
    jobs = [j for j in summary.jobs if j.failed is None]
    for ax, (label, field, log_y) in zip(axes.flat, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlim(*x_range)
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel("global batch B")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if not _panel(ax, jobs, field):
            ax.text(
                0.5,
                0.5,
                empty_panel(jobs, field, summary.target),
                transform=ax.transAxes,
                ha="center",
            )
            continue
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
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    left = f"; {len(summary.left_out)} run(s) that did not learn left out" * bool(summary.left_out)
    fig.suptitle(f"batch-size sweep, target accuracy {summary.target:g}{left}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(ax: Any, jobs: list[SweepRun], field: str) -> bool:
    """One panel's points (the median per batch, each run where a batch has several, the upper
    bounds marked); False when no job has the field."""
    points = [(j.global_batch, getattr(j, field), j.upper_bound) for j in jobs]
    points = [p for p in points if p[1] is not None]
    if not points:
        return False
    by_batch: dict[int, list[float]] = {}
    for b, v, _ in points:
        by_batch.setdefault(b, []).append(v)
    medians = [(b, statistics.median(v)) for b, v in sorted(by_batch.items())]
    several = any(len(v) > 1 for v in by_batch.values())
    ax.plot(*zip(*medians, strict=True), "o-", label="measured" + (" (median)" * several))
    if several:
        each = [(b, v) for b, v, _ in points]
        ax.plot(*zip(*each, strict=True), ".", color="C0", alpha=0.35, label="each run")
    bounds = [(b, v) for b, v, bound in points if bound]
    if bounds and field in ("time_to_target", "steps_to_target", "samples_to_target"):
        ax.plot(
            *zip(*bounds, strict=True),
            "v",
            color="C1",
            label="at the first evaluation (an upper bound)",
        )
    return True


def plot_run(
    records: list[dict[str, Any]], plan: dict[str, Any], found: list[dict[str, Any]], path: Path
) -> None:
    """training.png: B_simple and the running critical batch over the run's samples (with the
    branched probes' critical batches), and the global batch over samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = plan["global_batch"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, constrained_layout=True)
    noise = noise_over_training(records, batch)
    if noise:
        x, phi, crit = zip(*noise, strict=True)
        top.plot(x, phi, ".", alpha=0.35, label="B_simple (moving average, logged)")
        top.plot(x, crit, "-", label="critical batch of the run so far")
    for p in found:
        label = "branched probe (launcher.cbs)" if p is found[0] else None
        top.plot(p["consumed_samples"], p["critical_batch"], "s", color="C3", label=label)
        if p.get("interpolated"):
            top.plot(p["consumed_samples"], p["interpolated"], "x", color="C3")
    top.set_yscale("log")
    top.set_ylabel("batch (samples)")
    top.grid(True, which="both", alpha=0.3)
    if top.get_legend_handles_labels()[0]:
        top.legend(fontsize="small")
    steps = batch_over_samples(records, batch)
    if steps:
        bottom.step(*zip(*steps, strict=True), where="post")
    bottom.set_yscale("log", base=2)
    bottom.set_ylabel("global batch")
    bottom.set_xlabel("samples trained")
    bottom.grid(True, which="both", alpha=0.3)
    fig.suptitle("noise scale, critical batch and global batch over the run")
    fig.savefig(path, dpi=100)
    plt.close(fig)

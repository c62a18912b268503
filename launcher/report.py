"""Sweep report: what a batch-size sweep measured, the critical batch it implies, and the batch to
use.

    python -m launcher -m +recipe=mnist1d global_batch=32,64,128,256,512    # the sweep
    python -m launcher.report outputs/mnist1d/multirun-<stamp> [--target 0.95] [--out DIR]

Reads every job folder of the sweep (a subfolder with plan.json and metrics.jsonl) and writes
report.md (a table, one row per job, and the lines below) and report.png (accuracy, time to
target, steps to target with the fit, throughput; each against the global batch B).

Per job, from metrics.jsonl:
- final accuracy: the last evaluation; steps/samples/time to target: at the first evaluation with
  eval_accuracy >= target (time = train_s there: training seconds, evaluation and checkpoints
  excluded);
- samples/s = samples / train_s at the end (training throughput); runs that predate train_s fall
  back to the last logged samples_per_s (which includes evaluation time);
- noise scale: the run's critical batch from its logged B_simple = tr(Sigma)/|G|^2 (McCandlish et
  al. 2018, "An Empirical Model of Large-Batch Training"), averaged over the run with the weights
  a fixed batch meets it with (launcher.batchsize.advice.critical_batch). The sweep's noise
  scale phi is the median over its jobs.

Over the sweep:
- steps to target S against the batch B follow S = S_min (1 + B_crit / B) (McCandlish et al.
  2018, eq. 2.11); `fit_critical_batch` fits it in log space (relative errors: the steps span an
  order of magnitude or more). E_min = S_min B_crit is the fewest samples that reach the target.
- fastest batch: the least measured time to target (with several runs per batch, e.g. a sweep
  over seeds too, the least median over its runs; a run that missed the target counts as never).
- goodput-optimal batch (Pollux, Qiao et al. OSDI'21, eq. 1-2): goodput(B) = samples_per_s(B) x
  efficiency(B), efficiency(B) = (phi + B_0) / (phi + B), B_0 the sweep's smallest batch: the
  samples per second of B_0-equivalent progress.

An Optuna search's folder (hydra/sweeper=optuna) reads as a grid's: its trials are the job
folders; the report adds the search's best trial (optimization_results.yaml) and the job that
ran it.

Given one run's folder instead, it prints that run's batch-size advice
(launcher/batchsize/advice.py) with its history (launcher/batchsize/history.py) and writes
training.png there (or to --out).

Bad input (no such folder, no job folders, a target outside (0, 1), an unreadable file) prints one
line on stderr and exits 2; nothing is written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from launcher.batchsize.advice import advise, format_advice
from launcher.batchsize.sweep import (
    find_jobs,
    format_report,
    name_key,
    plot_report,
    read_job,
    summarize_job,
    summarize_sweep,
)
from launcher.errors import ConfigError

PROG = "launcher.report"
ADVICE_KEYS = ("global_batch", "world_size", "micro_batch", "accumulation", "epoch_samples")


# ---------------------------------------------------------------------------------------------
# command line


def print_run_advice(run_dir: Path, target: float | None, out: Path | None) -> int:
    """One run's folder: print its advice (what the run printed at its end) with its ramp
    decisions, loss spikes and branched probes; write training.png (noise scale and critical
    batch over training, the batch over samples) to `out` (default: the run's folder).
    `target`: the eval accuracy its epochs-to-target column counts to (None: the run's
    target_accuracy, else its own final eval loss)."""
    from launcher.batchsize.history import format_history, probes
    from launcher.planning.prior import from_records

    plan, records = read_job(run_dir)
    missing = [k for k in ADVICE_KEYS if not isinstance(plan.get(k), int)]
    if missing:
        raise ConfigError(f"{str(run_dir / 'plan.json')!r}: not a plan (no integer {missing[0]})")
    cfg = _run_config(run_dir)
    if target is None and cfg is not None:
        target = cfg.target_accuracy
    own = from_records(run_dir, plan["global_batch"], records, target)
    reached = (own.target, own.samples) if own is not None and own.samples else None
    advice = advise(records, plan, reached)
    if advice is None:
        raise ConfigError(
            f"{str(run_dir)!r}: no batch-size advice: the run logged no noise scale or step "
            "timing (trainer.noise_scale=false, backend=deepspeed, or too few steps)"
        )
    found = probes(run_dir)
    lines = [format_advice(advice), *format_history(records, found)]
    if cfg is not None:
        from launcher.batchsize.run_advice import next_sentence

        memory = plan.get("memory") or {}
        lines.append(next_sentence(cfg.optim, cfg.cluster, advice, memory.get("cap")))
    out = out or run_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={str(out)!r}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    plot_run(records, plan, found, out / "training.png")
    print("\n".join(lines), f"written: {out / 'training.png'}", sep="\n", flush=True)
    return 0


def _run_config(run_dir: Path) -> Any:
    """The run's RunConfig from its config.yaml, or None where it cannot be read back."""
    import yaml

    from launcher.config.schema import to_run_config

    try:
        return to_run_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, ConfigError):  # not there, or written by an older launcher
        return None


def plot_run(records: list[dict], plan: dict, found: list[dict], path: Path) -> None:
    """training.png: B_simple and the running critical batch over the run's samples (with the
    branched probes' critical batches), and the global batch over samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from launcher.batchsize.history import batch_over_samples, noise_over_training

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as the launcher does, not the usage
        raise ConfigError(message)


def _ran(job_dir: Path, params: dict) -> bool:
    """Whether a job folder's .hydra/overrides.yaml holds every one of `params`."""
    import yaml

    try:
        given = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
        values = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in given)}
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    for key, value in params.items():
        got = values.get(key)
        same = got == value or (
            isinstance(got, (int, float)) and isinstance(value, float) and math.isclose(got, value)
        )
        if not same:
            return False
    return True


def search_lines(sweep_dir: Path, jobs: list[Path]) -> list[str]:
    """The best trial of an Optuna search (its optimization_results.yaml) and the job folder
    that ran it; [] for a grid."""
    import yaml

    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return []
    try:
        found = yaml.safe_load(path.read_text())
        params, best = dict(found["best_params"]), float(found["best_value"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r}: not an Optuna search's results ({exc})") from None
    ran = sorted((d.name for d in jobs if _ran(d, params)), key=name_key)
    where = f"job {', '.join(ran)}" if ran else "no job folder here ran it"
    chosen = " ".join(f"{k}={v}" for k, v in params.items())
    return [f"- Search (optuna): best objective {best:.6g} at {chosen} ({where})."]


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog=f"python -m {PROG}",
        description="Table, critical-batch fit, recommended batch and plots for a sweep.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep's folder (one subfolder per job)")
    parser.add_argument(
        "--target",
        type=float,
        help="eval accuracy to reach (default 0.95; for one run's advice: its final eval loss)",
    )
    parser.add_argument("--out", type=Path, help="where report.md/png go (default: sweep_dir)")
    try:
        args = parser.parse_args(argv)
        if args.target is not None and not 0 < args.target < 1:
            raise ConfigError(f"--target={args.target}: must be in (0, 1)")
        if (args.sweep_dir / "plan.json").is_file():  # one run: its batch-size advice
            return print_run_advice(args.sweep_dir, args.target, args.out)
        target = 0.95 if args.target is None else args.target
        folders = find_jobs(args.sweep_dir)
        jobs = [summarize_job(d.name, *read_job(d), target) for d in folders]
        summary = summarize_sweep(jobs, target)
        text = format_report(summary, str(args.sweep_dir))
        text += "".join(f"{line}\n" for line in search_lines(args.sweep_dir, folders))
        out = args.out or args.sweep_dir
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out={str(out)!r}: not a directory")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    plot_report(summary, out / "report.png")
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

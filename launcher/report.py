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
- only jobs that learned count (launcher/batchsize/outcome.py); the others are marked in the
  table and said, with the reason;
- steps to target S against the batch B follow S = S_min (1 + B_crit / B) (McCandlish et al.
  2018, eq. 2.11); `fit_critical_batch` fits it in log space (relative errors: the steps span an
  order of magnitude or more). E_min = S_min B_crit is the fewest samples that reach the target.
  A run that reached the target at its first evaluation has only an upper bound (`<=`) and is
  left out; where the rest cannot determine the fit (launcher/batchsize/fit.py) there are no fit
  numbers, and one line says why;
- fastest batch: the least measured time to target (with several runs per batch, e.g. a sweep
  over seeds too, the least median over its runs; a run that missed the target counts as never);
  not determined while a run's time to it is an upper bound.
- goodput-optimal batch (Pollux, Qiao et al. OSDI'21, eq. 1-2): goodput(B) = samples_per_s(B) x
  efficiency(B), efficiency(B) = (phi + B_0) / (phi + B), B_0 the sweep's smallest batch: the
  samples per second of B_0-equivalent progress.

An Optuna search's folder (hydra/sweeper=optuna) reads as a grid's: its trials are the job
folders; the report adds the search's best trial (optimization_results.yaml) and the job that
ran it.

Given one run's folder instead, it prints that run's batch-size advice
(launcher/batchsize/advice.py) with its history (launcher/batchsize/history.py) and writes
training.png there (or to --out).

Bad input prints one line on stderr and exits 2, and nothing is written: no such folder, a folder
that is neither a run (plan.json) nor a sweep (job folders of one recipe, model and data, with
something measured), a target outside (0, 1), a plan.json, metrics.jsonl, config.yaml or Optuna
result that is not what the launcher writes, an --out that cannot be written. A write that fails
(a full disk) is one line and exit 5 (WriteFailed), with nothing left behind.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from launcher.batchsize.advice import format_advice
from launcher.batchsize.history import format_history, probes
from launcher.batchsize.plots import plot_report, plot_run
from launcher.batchsize.run_advice import advice_or_why, next_sentence
from launcher.batchsize.sweep import (
    find_jobs,
    format_report,
    name_key,
    read_job,
    summarize_job,
    summarize_sweep,
)
from launcher.checkpoint.paths import WriteFailed, check_writable
from launcher.config.schema import to_run_config
from launcher.errors import ConfigError, LauncherError

Writer = Callable[[Path], Any]  # writes one output file at the path it is given

PROG = "launcher.report"
ADVICE_KEYS = ("global_batch", "world_size", "micro_batch", "accumulation", "epoch_samples")


# ---------------------------------------------------------------------------------------------
# command line


def run_report(run_dir: Path, target: float | None) -> tuple[str, dict[str, Writer]]:
    """One run's folder: its advice (what the run printed at its end) with its ramp decisions,
    loss spikes and branched probes, and training.png (noise scale and critical batch over
    training, the batch over samples) to write. `target`: the eval accuracy its
    epochs-to-target column counts to (None: the run's target_accuracy, else its own final eval
    loss)."""
    plan, records = read_job(run_dir)
    missing = [k for k in ADVICE_KEYS if not isinstance(plan.get(k), int)]
    if missing:
        raise ConfigError(f"{str(run_dir / 'plan.json')!r}: not a plan (no integer {missing[0]})")
    cfg, why_no_config = _run_config(run_dir)
    if target is None and cfg is not None:
        target = cfg.target_accuracy
    advice, why = advice_or_why(run_dir, records, plan, target)
    if advice is None:
        raise ConfigError(f"{str(run_dir)!r}: no batch-size advice: {why}")
    left_out: list[str] = []
    found = probes(run_dir, left_out)
    lines = [format_advice(advice), *format_history(records, found)]
    lines += [f"  left out (not a probe's result): {where}" for where in left_out]
    if cfg is not None:
        memory = plan.get("memory") or {}
        lines.append(next_sentence(cfg.optim, cfg.cluster, advice, memory.get("cap")))
    else:
        lines.append(f"  next: no sentence ({why_no_config})")

    def draw(path: Path) -> None:
        plot_run(records, plan, found, path)

    return "\n".join(lines), {"training.png": draw}


def _run_config(run_dir: Path) -> tuple[Any, str]:
    """(the run's RunConfig from its config.yaml, "") or (None, why not): not there, or written
    by another version of the launcher. A config.yaml that is no YAML mapping is bad input."""
    node = read_config(run_dir)
    if node is None:
        return None, "the run folder has no config.yaml"
    try:
        return to_run_config(node), ""
    except ConfigError as exc:
        return None, f"its config.yaml does not read as this launcher's: {exc}"


def read_config(folder: Path) -> dict[str, Any] | None:
    """A run folder's config.yaml as a mapping; None where there is none."""
    import yaml

    path = folder / "config.yaml"
    if not path.exists():
        return None
    try:
        node = yaml.safe_load(path.read_text())
        if not isinstance(node, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        line = str(why).splitlines()[0] if str(why) else type(exc).__name__
        raise ConfigError(f"{str(path)!r}: not a run's config ({line})") from None
    return node


def _workload(node: dict[str, Any]) -> str:
    """A run's recipe, model and data, in words (a sweep's jobs share them)."""

    def name(part: Any) -> Any:
        return part.get("name", part.get("_target_")) if isinstance(part, dict) else part

    model, data = name(node.get("model")), name(node.get("data"))
    return f"recipe {node.get('recipe')}, model {model}, data {data}"


def sweep_report(sweep_dir: Path, target: float | None) -> tuple[str, dict[str, Writer]]:
    """A sweep's folder: report.md's text, and report.md and report.png to write. Not a sweep
    (no job folders, jobs of different workloads, nothing measured yet): ConfigError."""
    target = 0.95 if target is None else target
    folders = find_jobs(sweep_dir)
    read = [(d, *read_job(d)) for d in folders]
    workloads: dict[str, str] = {}
    for d in folders:
        node = read_config(d)
        if node is not None:
            workloads.setdefault(_workload(node), d.name)
    if len(workloads) > 1:
        (one, a), (two, b) = list(workloads.items())[:2]
        raise ConfigError(
            f"{str(sweep_dir)!r}: not one sweep: its job folders train different workloads "
            f"({a}: {one}; {b}: {two}); give one sweep's folder"
        )
    if not any("loss" in r or "eval_loss" in r for _, _, records in read for r in records):
        raise ConfigError(
            f"{str(sweep_dir)!r}: nothing to report yet: no job folder's metrics.jsonl holds a "
            "training or evaluation record"
        )
    jobs = [summarize_job(d.name, plan, records, target) for d, plan, records in read]
    summary = summarize_sweep(jobs, target)
    text = format_report(summary, str(sweep_dir))
    text += "".join(f"{line}\n" for line in search_lines(sweep_dir, folders))

    def draw(path: Path) -> None:
        plot_report(summary, path)

    return text, {"report.md": lambda path: path.write_text(text), "report.png": draw}


def write_files(out: Path, key: str, files: dict[str, Writer]) -> list[Path]:
    """Write each file into folder `out` (made if missing): all to temporary names first, then
    each renamed into place, so a failed write (WriteFailed: one line, exit 5) leaves nothing
    behind; a folder that cannot be written is bad input (`key` names it)."""
    import contextlib
    import os

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}={str(out)!r}: not a directory")
    check_writable(out, key)
    made = [p for p in (out, *out.parents) if not p.exists()]  # the folders this call makes
    out.mkdir(parents=True, exist_ok=True)
    done: list[tuple[Path, Path]] = []
    for name, write in files.items():
        final = out / name
        done.append((out / f".{final.stem}.tmp{final.suffix}", final))
        try:
            write(done[-1][0])
        except OSError as exc:
            with contextlib.suppress(OSError):
                for temporary, _ in done:
                    temporary.unlink(missing_ok=True)
                for folder in made:
                    folder.rmdir()
            raise WriteFailed(name, final, exc) from None
    for temporary, final in done:
        os.replace(temporary, final)
    return [final for _, final in done]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, as the launcher does
        raise ConfigError(message)


def _ran(job_dir: Path, params: dict[str, Any]) -> bool:
    """Whether a job folder's .hydra/overrides.yaml holds every one of `params`."""
    import yaml

    try:
        given = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
        values = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in given)}
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # no overrides.yaml to read
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
    parser.add_argument(
        "sweep_dir", type=Path, help="the sweep's folder (one subfolder per job), or a run's"
    )
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
        if (args.sweep_dir / "plan.json").exists():  # one run: its batch-size advice
            text, files = run_report(args.sweep_dir, args.target)
        else:
            text, files = sweep_report(args.sweep_dir, args.target)
        out = args.out or args.sweep_dir
        written = write_files(out, "--out", files)
    except LauncherError as exc:  # bad input: exit 2; a write that failed: WriteFailed, exit 5
        line = str(exc).removeprefix("launcher: error: ")
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
        return exc.exit_code
    print(text)
    print(f"written: {', '.join(str(p) for p in written)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An earlier run of the same workload, and whether this run's epochs suffice at its batch.

The plan looks for the newest finished run next to its own run directory (outputs/<recipe>/*, and
the job folders of a sweep there) whose config.yaml names the same recipe, model and data, and
which measured a noise scale. From it: the critical batch B_crit (advice.critical_batch) and the
samples E_0 it took at its batch B_0 to reach the target (the first evaluation with
eval_accuracy >= target_accuracy; without a target, its own final eval loss). The empirical model
(McCandlish et al. 2018, E = E_min (1 + B/B_crit)) then says batch B needs
E_0 (B_crit + B) / (B_crit + B_0) samples for the same result (advice.samples_to_match).

Only files are read here (YAML with safe_load, JSON); folders that cannot be read as a finished
run are not candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.batchsize.advice import critical_batch, samples_to_match
from launcher.batchsize.outcome import why_not_learned
from launcher.batchsize.sweep import read_job
from launcher.config.schema import RunConfig, to_dict
from launcher.errors import ConfigError


@dataclass(frozen=True)
class Prior:
    run_dir: Path
    global_batch: int
    noise: float  # the run's critical batch
    samples: int | None  # samples to the target; None: it never reached it
    target: str  # what "the result" is, in words


def _same_workload(cfg: RunConfig, other: dict[str, Any]) -> bool:
    mine = to_dict(cfg)
    return all(other.get(k) == mine[k] for k in ("recipe", "model", "data"))


def _candidates(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    found = list(parent.glob("*/metrics.jsonl")) + list(parent.glob("*/*/metrics.jsonl"))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def read_prior(run_dir: Path, target_accuracy: float | None) -> Prior | None:
    """The run in `run_dir` as a Prior, or None when it is not a finished run with a noise
    scale, or one that diverged or did not learn (launcher/batchsize/outcome.py)."""
    try:
        plan, records = read_job(run_dir)
    except ConfigError:
        return None
    if not any(r.get("final") for r in records) or why_not_learned(records) is not None:
        return None
    return from_records(run_dir, plan["global_batch"], records, target_accuracy)


def from_records(
    run_dir: Path, batch: int, records: list[dict[str, Any]], target_accuracy: float | None
) -> Prior | None:
    """A run's metrics records as a Prior; None without a noise scale or an evaluation."""
    estimate = critical_batch([r for r in records if "loss" in r], batch)
    evals = [r for r in records if r.get("eval_loss") is not None and "samples" in r]
    evals = [r for r in evals if "event" not in r]
    if estimate is None or not evals:
        return None
    if target_accuracy is not None:
        target = f"eval accuracy >= {target_accuracy:g} (target_accuracy)"
        hit = next((r for r in evals if r.get("eval_accuracy", -1.0) >= target_accuracy), None)
    else:
        final = evals[-1]["eval_loss"]
        target = f"its final eval loss {final:.4g} (no target_accuracy set)"
        hit = next(r for r in evals if r["eval_loss"] <= final)
    return Prior(run_dir, batch, estimate[0], hit["samples"] if hit else None, target)


def find_prior(cfg: RunConfig, parent: Path, exclude: Path | None = None) -> Prior | None:
    """The newest finished run of the same recipe, model and data under `parent` that measured a
    noise scale, or None."""
    import yaml

    for metrics in _candidates(parent):
        folder = metrics.parent
        if exclude is not None and folder.resolve() == exclude.resolve():
            continue
        try:
            other = yaml.safe_load((folder / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(other, dict) or not _same_workload(cfg, other):
            continue
        prior = read_prior(folder, cfg.target_accuracy)
        if prior is not None:
            return prior
    return None


def budget(prior: Prior, batch: int, planned: int, epoch_samples: int) -> tuple[str, str]:
    """(value, reason) of the plan's budget row: are `planned` samples enough at `batch`?"""
    head = (
        f"earlier run {prior.run_dir} (batch {prior.global_batch:,}, critical batch "
        f"~{prior.noise:,.0f})"
    )
    if prior.samples is None:
        return "?", f"{head} never reached {prior.target}: no estimate"
    need = samples_to_match(prior.noise, prior.global_batch, prior.samples, batch)
    epochs, have = need / epoch_samples, planned / epoch_samples
    why = (
        f"{head} reached {prior.target} after {prior.samples:,} samples; at batch {batch:,} the "
        f"same needs ~{need:,.0f} samples = {epochs:.3g} epochs (x (B_crit + B) / (B_crit + "
        f"B_0), McCandlish et al. 2018)"
    )
    if need <= planned:
        return "enough", f"{why}; this run trains {have:.3g}"
    largest = planned * (prior.noise + prior.global_batch) / prior.samples - prior.noise
    fits = f"a global batch <= {largest:,.0f}" if largest >= 1 else "no batch"
    return "SHORT", (
        f"{why}, this run trains only {have:.3g}: it will likely fall short; train "
        f">= {epochs:.3g} epochs (trainer.epochs), or use {fits} at these epochs"
    )

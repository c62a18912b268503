"""The value a Hydra sweeper optimises: each job of `python -m launcher` returns it.

    objective=eval_accuracy      the final evaluation's accuracy (maximize; the default)
    objective=eval_loss          the final evaluation's loss (minimize)
    objective=samples_to_target  training samples at the first evaluation whose accuracy reaches
                                 target_accuracy (minimize; inf when no evaluation reached it, so
                                 a search ranks that trial last)

A search sweeper's direction follows from the objective (`direction`: hydra_app sets
hydra.sweeper.direction from it; a contradicting one is refused). Evaluations run every
trainer.eval_every_epochs and at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launcher.config.schema import RunConfig
from launcher.errors import ConfigError

DIRECTION = {"eval_accuracy": "maximize", "eval_loss": "minimize", "samples_to_target": "minimize"}


def value(kind: str, records: list[dict[str, Any]], target: float | None) -> float:
    """The objective of a finished run from its metrics records (metrics.jsonl, in order)."""
    evals = [r for r in records if "eval_loss" in r]
    if not evals:
        raise ConfigError(f"objective={kind!r}: the run wrote no evaluation")
    if kind == "eval_loss":
        return float(evals[-1]["eval_loss"])
    if "eval_accuracy" not in evals[-1]:
        raise ConfigError(
            f"objective={kind!r}: this run's evaluation gives no accuracy (its outputs are not "
            "class scores of integer targets); use objective=eval_loss"
        )
    if kind == "eval_accuracy":
        return float(evals[-1]["eval_accuracy"])
    assert target is not None  # RunConfig refuses samples_to_target without it
    reached = [r["samples"] for r in evals if r["eval_accuracy"] >= target]
    return float(reached[0]) if reached else math.inf


def direction(configs: Sequence[RunConfig], given: str | None) -> str:
    """The direction a search optimises the jobs' objective in (hydra.sweeper.direction): one
    objective per search, `given` (the command line's direction) only where it agrees, and an
    accuracy only where every job's evaluation gives one."""
    objectives = {cfg.objective for cfg in configs}
    if len(objectives) > 1:
        raise ConfigError("-m: a search cannot vary objective (what it optimises)")
    objective = objectives.pop()
    found = DIRECTION[objective]
    if given is not None and given != found:
        raise ConfigError(
            f"hydra.sweeper.direction={given}: objective={objective} is to {found}; "
            "drop the direction (the launcher sets it) or choose another objective"
        )
    if objective != "eval_loss":
        from launcher.memory.probe import gives_accuracy  # heavy: torch

        distinct = {repr((c.model, c.data, c.loss)): c for c in configs}
        if not all(gives_accuracy(cfg.model, cfg.data, cfg.loss) for cfg in distinct.values()):
            raise ConfigError(
                f"objective={objective}: this model's outputs are not class scores of integer "
                "targets, so its evaluation gives no accuracy; use objective=eval_loss"
            )
    return found


def of_run(run_dir: Path, kind: str, target: float | None, needed: bool) -> float | None:
    """A finished run's objective, from the records rank 0 wrote in `run_dir`. Records that give
    none: None, or the ConfigError that says why where a search needs the value (`needed`)."""
    from launcher.batchsize.sweep import read_job  # heavy: numpy

    try:
        return value(kind, read_job(run_dir)[1], target)
    except ConfigError:
        if needed:
            raise
        return None

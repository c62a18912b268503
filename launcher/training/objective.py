"""The value a Hydra sweeper optimises: each job of `python -m launcher` returns it.

    objective=eval_accuracy      the final evaluation's accuracy (maximize; the default)
    objective=eval_loss          the final evaluation's loss (minimize)
    objective=samples_to_target  training samples at the first evaluation whose accuracy reaches
                                 target_accuracy (minimize; inf when no evaluation reached it, so
                                 a search ranks that trial last)

The sweeper's direction follows from the objective (hydra_app sets it; a contradicting
hydra.sweeper.direction is refused). Evaluations run every trainer.eval_every_epochs and at the end.
"""

from __future__ import annotations

import math
from typing import Any

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

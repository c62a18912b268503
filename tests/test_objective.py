"""What a job returns to a Hydra sweeper (launcher/training/objective.py), from its metrics
records."""

from __future__ import annotations

import math

import pytest

from launcher.errors import ConfigError
from launcher.training.objective import DIRECTION, value

RECORDS = [
    {"step": 1, "samples": 64, "loss": 2.3},
    {"step": 2, "samples": 128, "eval_loss": 1.5, "eval_accuracy": 0.60},
    {"step": 4, "samples": 256, "eval_loss": 0.9, "eval_accuracy": 0.91},
    {"step": 6, "samples": 384, "eval_loss": 1.0, "eval_accuracy": 0.90},
    {"final": True, "step": 6, "samples": 384},
]


def test_each_objective_from_the_records() -> None:
    assert value("eval_accuracy", RECORDS, None) == 0.90  # the final evaluation's, not the best
    assert value("eval_loss", RECORDS, None) == 1.0
    assert value("samples_to_target", RECORDS, 0.9) == 256  # the first evaluation to reach it
    assert value("samples_to_target", RECORDS, 0.95) == math.inf  # a search ranks it last
    assert DIRECTION == {
        "eval_accuracy": "maximize",
        "eval_loss": "minimize",
        "samples_to_target": "minimize",
    }


def test_an_objective_the_run_cannot_give_is_one_line() -> None:
    no_accuracy = [{"step": 2, "samples": 128, "eval_loss": 1.5}]
    assert value("eval_loss", no_accuracy, None) == 1.5
    with pytest.raises(ConfigError, match="gives no accuracy .*use objective=eval_loss"):
        value("eval_accuracy", no_accuracy, None)
    with pytest.raises(ConfigError, match="wrote no evaluation"):
        value("eval_loss", RECORDS[:1], None)

"""A run's length as its config states it (trainer.epochs, samples or tokens): exactly, in words,
and the noise-scale window it implies. PURE."""

from __future__ import annotations

from fractions import Fraction

from launcher.config.execution import TrainerConfig
from launcher.planning.rules import fmt


def run_samples(trainer: TrainerConfig, epoch_samples: int) -> Fraction:
    """trainer.samples, or trainer.epochs x the epoch, exactly (1.1 x 50000 is 55000): what the
    steps must cover."""
    if trainer.samples:
        return Fraction(trainer.samples)
    return Fraction(repr(trainer.epochs)) * epoch_samples


def run_length(trainer: TrainerConfig, epoch_samples: int, per_sample: int = 0) -> str:
    """The run's length as its config states it, in words (the reasons' formulas)."""
    if trainer.tokens:
        return f"{trainer.tokens:,} tokens / {per_sample} = {trainer.samples:,} (trainer.tokens)"
    if trainer.samples:
        return f"{trainer.samples:,} samples (trainer.samples)"
    return f"{fmt(trainer.epochs)} epochs x {epoch_samples:,}"


def noise_window_samples(trainer: TrainerConfig, epoch_samples: int) -> float:
    """The noise-scale averages' time constant in samples: trainer.noise_window x the run's
    samples (run_samples, not the plan's rounded total, which moves with the batch)."""
    return trainer.noise_window * float(run_samples(trainer, epoch_samples))

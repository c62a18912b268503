"""The training loop's bundles (launcher/training/loop.py `fit`), which the evaluation, the
checkpointer and the job's phases share: what a step runs on (Trainee), the data (Feed), how the
loop runs (Settings) and what the job does at its events (Hooks); and what the loop asks of the
loss and of the step-health check, as protocols (launcher/models/loss.py, guard.py hold them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from launcher.types.backend import Backend
from launcher.types.plan import BatchPlan


class Loss(Protocol):
    """A training loss (the built-in cross-entropy, or your own): one value per sample, summed
    over a micro-batch (the loop divides by the global batch); `eval_counts` gives evaluation
    [correct, predictions, summed loss, its count] of a batch."""

    def per_token(self, y: torch.Tensor, /) -> bool:
        """Whether the loss of targets like `y` is a mean per token (sequences): then it is a
        TokenLoss (the loop relies on that)."""

    def sum(self, outputs: Any, y: torch.Tensor, /) -> torch.Tensor: ...

    def eval_counts(self, outputs: Any, y: torch.Tensor, /) -> torch.Tensor: ...


class TokenLoss(Loss, Protocol):
    """A loss that can also be a mean per token over the global batch (the cross-entropy of
    sequences): the loop counts a step's target tokens first, then sums each micro-batch's."""

    def counted(self, y: torch.Tensor, /) -> int: ...

    def token_sum(self, outputs: Any, y: torch.Tensor, /) -> torch.Tensor: ...


class StepHealth(Protocol):
    """This rank's step-health check (launcher/training/guard.py Health): the flag bits of a
    step before it is applied, and what the loop's events and messages say of it."""

    @property
    def loss(self) -> float:
        """This rank's loss of the step just checked."""

    @property
    def mean(self) -> float:
        """The mean of the recent applied steps' losses it was compared with."""

    @property
    def median(self) -> float:
        """The median of the recent window (a divergence)."""

    @property
    def start(self) -> float | None:
        """The loss at the start of the run."""

    @property
    def diverge_factor(self) -> float: ...

    @property
    def norms(self) -> torch.Tensor | None:
        """The 2-norms of this rank's gradients of the step just checked, one per tensor
        (None: not computed, as when the loss was not finite or fp16's scaler owns them)."""

    def bits(self, loss: torch.Tensor, model: Any, check_grads: bool) -> int:
        """NON_FINITE, SPIKE and/or DIVERGED (guard.py) for this rank's step."""

    def applied(self) -> None:
        """The step was taken."""


@dataclass(frozen=True)
class Trainee:
    """What a step runs on: the prepared model and optimizer (the optimizer is a torch one or
    DeepSpeed's untyped wrapper of one: Any), the backend that owns them, the training loss
    (launcher/models/loss.py) and the dtype floating-point inputs are cast to."""

    model: torch.nn.Module
    optimizer: Any
    backend: Backend
    dtype: torch.dtype
    loss_fn: Loss


@dataclass(frozen=True)
class Feed:
    """The data: `train(plan, step)` yields the plan's micro-batches from `step` on (this rank's
    share; a new plan after a ramp stage or an OOM re-split gets a new stream), `evaluation(plan)`
    the eval split's."""

    train: Callable[[BatchPlan, int], Iterable[Any]]
    evaluation: Callable[[BatchPlan], Iterable[Any]]


@dataclass(frozen=True)
class Settings:
    """How the loop runs: metrics every `log_every` steps, an evaluation every
    `eval_every_samples`; OOM-safe steps; the step-health check (launcher/training/guard.py)."""

    log_every: int
    eval_every_samples: int
    oom_recovery: bool = True
    health: StepHealth | None = None
    skip_spikes: bool = False
    nonfinite_limit: int = 3


@dataclass(frozen=True)
class Hooks:
    """What the job does at the loop's events. `after_step(step, plan)`: after every completed
    step (checkpoints, stopping); `on_oom(old, new, step, ranks)`: after an out-of-memory re-split;
    `grow(step, plan, noise)`: the adaptive ramp's decision at a log step (a collective), the
    plan of a larger batch or None."""

    after_step: Callable[[int, BatchPlan], None] | None = None
    on_oom: Callable[[BatchPlan, BatchPlan, int, list[int]], None] | None = None
    grow: Callable[[int, BatchPlan, float | None], BatchPlan | None] | None = None

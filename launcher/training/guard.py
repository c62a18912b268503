"""Step health: non-finite losses and gradients, loss spikes, non-finite parameters.

Every rank looks at its own step before it is applied (its loss, and its gradients unless fp16
loss scaling owns them: the scaler skips overflowing steps itself) and sets bits in the flag that
the out-of-memory check already gathers from every rank, so all ranks take the same decision:

- NON_FINITE: the step is not applied (gradients dropped); its samples count as consumed, so the
  schedule goes on. `trainer.nonfinite_limit` such steps in a row stop the run with Diverged
  (exit 4, one line naming the step, the LR and what to try).
- SPIKE: the rank's loss is above `trainer.spike_factor` x the mean of its last WINDOW applied
  steps: a `loss_spike` event; with `trainer.skip_spikes` the step is not applied either.
- DIVERGED: divergence that stays finite (an LR far past stability: the loss climbs by orders of
  magnitude and stays there). The median of the rank's last WINDOW applied steps is above
  `trainer.diverge_factor` x its loss at the start of the run (the first step's, at the initial
  weights): the run stops as diverged (exit 4) without applying the step. A median needs more
  than half of the window up there: a few spikes are not a divergence. Not caught: a loss that
  is not positive at the start (the ratio means nothing), a climb of less than the factor, a
  model that stops learning without its loss rising (the advice's rule says it did not learn).

Parameters that became non-finite through a finite step (an LR far past stability) are caught
before anything is saved, a checkpoint or the final weights (every rank checks its own and the
flag gather decides), so no non-finite value reaches a file. metrics.jsonl writes a non-finite
number as null (valid JSON always).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch

from launcher.errors import LauncherError
from launcher.types.bundles import StepHealth

OOM, NON_FINITE, SPIKE, DIVERGED = 1, 2, 4, 8  # bits of the per-step flag (train.py gathers them)
WINDOW = 20  # applied steps a spike is measured against
EXIT_CODE = 4
ADVICE = (
    "lower optim.base_lr, lengthen the warmup (schedule.warmup_epochs), clip gradients "
    "(optim.clip_grad_norm=1), or use the sqrt scaling rule (optim.scaling=sqrt)"
)


class Diverged(LauncherError):
    """Training produced non-finite values it cannot step past."""

    exit_code = EXIT_CODE
    prefix = ""  # the message is the whole line


class Health:
    """This rank's view of its steps: the flag bits of a step, the recent losses, the loss at
    the start of the run (`start`: kept in checkpoints, so a resumed run compares with it)."""

    def __init__(
        self, spike_factor: float, diverge_factor: float, start: float | None = None
    ) -> None:
        self.spike_factor, self.diverge_factor = spike_factor, diverge_factor
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.start = start
        self.loss = math.nan  # this rank's loss of the step just checked
        self.mean = math.nan  # what it was compared with
        self.median = math.nan  # of the window, against the start (DIVERGED)
        self.norms: torch.Tensor | None = None  # this step's gradient norms, one per tensor

    def bits(self, loss: torch.Tensor, model: Any, check_grads: bool) -> int:
        """NON_FINITE, SPIKE and/or DIVERGED for this rank's step (one device-to-host copy).
        The gradient norms it computes stay in `norms` for the step's clip and noise meter."""
        self.loss, self.norms = float(loss), None
        if not math.isfinite(self.loss):
            return NON_FINITE
        if check_grads:
            self.norms = grad_norms(model)
            if self.norms is not None and not bool(torch.isfinite(self.norms).all()):
                return NON_FINITE
        if self.start is None:
            self.start = self.loss
        self.mean = sum(self.recent) / len(self.recent) if self.recent else math.nan
        full = len(self.recent) == WINDOW
        bits = (
            SPIKE
            if full and self.spike_factor > 0 and self.loss > self.spike_factor * self.mean
            else 0
        )
        if full and self.diverge_factor > 0 and self.start > 0:
            self.median = statistics.median_low(self.recent)  # more than half of them up
            bits |= DIVERGED if self.median > self.diverge_factor * self.start else 0
        return bits

    def applied(self) -> None:
        """The step was taken: its loss joins the window."""
        self.recent.append(self.loss)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (FSDP2's DTensors), else the tensor: each rank
    checks its own part, and the flag gather tells every rank."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norms(model: Any) -> torch.Tensor | None:
    """The 2-norms of this rank's gradients (its shards), one per tensor in parameter order,
    stacked (None: no gradient): what torch's clip_grad_norm_ and the noise meter compute from
    the same tensors (torch._foreach_norm)."""
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)) if grads else None


def params_finite(model: Any) -> bool:
    """This rank's parameters and floating buffers are all finite."""
    tensors = [local(t) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())


def state_message(step: int, what: str) -> str:
    """Parameters went non-finite through a step with finite gradients (an LR past stability)."""
    return (
        f"launcher: diverged: the parameters are not finite after step {step:,}; {what} not "
        f"written (any earlier one on disk is finite). Try: {ADVICE}"
    )


def diverged_message(step: int, lr: float, health: StepHealth) -> str:
    """The one line of a run stopped by a loss that climbed and stayed up (DIVERGED)."""
    return (
        f"launcher: diverged: the loss stayed above {health.diverge_factor:g} x its value at the "
        f"start of the run at step {step:,} (median {health.median:.4g} over the last {WINDOW} "
        f"steps vs {health.start:.4g} at the first; lr {lr:.4g}); the step was not applied, no "
        f"checkpoint of it written (trainer.diverge_factor). Try: {ADVICE}"
    )


def non_finite_message(steps: list[int], lr: float, last_applied: int) -> str:
    """The one line of a run stopped by non-finite steps in a row."""
    at = ", ".join(f"{s:,}" for s in steps)
    return (
        f"launcher: diverged: non-finite loss or gradients at steps {at} in a row (lr {lr:.4g} at "
        f"step {steps[-1]:,}); nothing applied since step {last_applied:,}, no checkpoint of it "
        f"written. Try: {ADVICE}"
    )

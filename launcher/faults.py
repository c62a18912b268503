"""Fault injection for tests, inert unless LAUNCHER_TEST_KILL, LAUNCHER_TEST_OOM or
LAUNCHER_TEST_LOSS is set (the last two: test_oom_hook and test_loss_hook below).

LAUNCHER_TEST_KILL=STEP:PHASE[:ACTION][,...] acts at optimizer step STEP, PHASE `step` (after the
step), `written` (checkpoint written under its temporary name), `renamed` (in place, `latest` not
yet updated), `stopping` (a signal's checkpoint saved, the run about to stop) or, at STEP 0,
`preparing` (before the data is built), `exit` (the run stopped, the process exiting) or `exited`
(its exit handlers done, the last moment before it ends). ACTION: KILL (default; SIGKILL, as
`kill -9` would), USR1, USR2, TERM or INT (sends that signal to this process), FILL (fills the
file system of the file LAUNCHER_TEST_FILL names), WAIT (blocks until SIGUSR1 or SIGTERM
arrives, at most 10 minutes, so a test can deliver it from outside at a known step).

This module is at the bottom of the package (README "Architecture", layer 1): it imports no other
launcher module, so every layer may call its hooks. What ends a WAIT, the job's record of the
signals it received (launcher/cluster/preemption.py), is handed in by the job (`waits_for`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Split(Protocol):
    """What test_oom_hook reads of a plan (a BatchPlan, which lives above this layer)."""

    @property
    def micro_batch(self) -> int: ...

    @property
    def accumulation(self) -> int: ...


def _no_signal() -> int:
    return 0


_signals: Callable[[], int] = _no_signal  # what ends a WAIT: the signals received so far


def waits_for(signals: Callable[[], int]) -> None:
    """A WAIT ends once `signals()` is non-zero: the job hands in preemption.received, the
    record its signal handlers keep (a signal that came before the WAIT ends it at once)."""
    global _signals
    _signals = signals


def test_kill(step: int, phase: str) -> None:
    spec = os.environ.get("LAUNCHER_TEST_KILL")
    if not spec:
        return
    for item in spec.split(","):
        at_step, at_phase, action = (item.split(":") + ["KILL"])[:3]
        if (at_step, at_phase) != (str(step), phase):
            continue
        if action == "WAIT":
            deadline = time.monotonic() + 600
            while not _signals() and time.monotonic() < deadline:
                time.sleep(0.05)
        elif action == "FILL":
            _fill(os.environ["LAUNCHER_TEST_FILL"])
        else:
            os.kill(os.getpid(), getattr(signal, f"SIG{action}"))


def _fill(path: str) -> None:
    """Write `path` until its file system is full (a real ENOSPC for what comes next)."""
    block = b"\0" * (1 << 16)
    with open(path, "ab") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    while True:  # the last partial blocks too
        try:
            with open(path, "ab") as f:
                f.write(b"\0")
        except OSError:
            return


def test_oom_hook(rank: int, step: int, plan: Split) -> Callable[[int], None] | None:
    """Test hook: LAUNCHER_TEST_OOM=RANK:STEP:MAX_MICRO makes that rank run out of memory before
    the last micro-step of every step >= STEP while its micro-batch is above MAX_MICRO (a CPU
    stand-in for a GPU that cannot hold the activations)."""
    spec = os.environ.get("LAUNCHER_TEST_OOM")
    if not spec:
        return None
    oom_rank, from_step, max_micro = (int(v) for v in spec.split(":"))
    if rank != oom_rank or step < from_step or plan.micro_batch <= max_micro:
        return None

    def hook(j: int) -> None:
        import torch

        if j == plan.accumulation - 1:
            raise torch.OutOfMemoryError(f"LAUNCHER_TEST_OOM={spec}: injected at step {step}")

    return hook


class _Scaled:
    """A loss times a factor (the LAUNCHER_TEST_LOSS hook)."""

    def __init__(self, loss_fn: Any, factor: float) -> None:
        self.loss_fn, self.factor = loss_fn, factor

    def sum(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        scaled: torch.Tensor = self.loss_fn.sum(outputs, y) * self.factor
        return scaled

    def token_sum(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        scaled: torch.Tensor = self.loss_fn.token_sum(outputs, y) * self.factor
        return scaled

    def __getattr__(self, name: str) -> Any:  # per_token, counted: the loss's own
        return getattr(self.loss_fn, name)


def test_loss_hook(rank: int, step: int, loss_fn: Any) -> Any:
    """Test hook: LAUNCHER_TEST_LOSS=RANK:STEP:FACTOR[,...] multiplies that rank's loss (and so
    its gradients) at optimizer step STEP (1-based) by FACTOR (nan and inf allowed): a stand-in
    for a batch that blows up."""
    for item in filter(None, os.environ.get("LAUNCHER_TEST_LOSS", "").split(",")):
        at_rank, at_step, factor = item.split(":")
        if int(at_rank) == rank and int(at_step) == step:
            return _Scaled(loss_fn, float(factor))
    return loss_fn

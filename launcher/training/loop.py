"""The training loop: micro-steps, accumulation, LR per step, evaluation, metrics.

It knows nothing of Hydra or DeepSpeed: it gets a built model and optimizer (a Trainee), the
BatchPlan, a backend and the micro-batch streams (a Feed; launcher/types/bundles.py). The loss is
normalised by the global batch (launcher/models/loss.py): each rank sums its per-sample losses
over `accumulation` micro-batches and divides by its per-device batch, or for a loss per token
(sequences) sums its token losses and divides by the global batch's counted tokens / the world
size; the backend's all-reduce then averages over ranks, which is the mean over the global batch.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any, NoReturn, cast

import torch

from launcher import faults, log
from launcher.batchsize.meter import NoiseMeter
from launcher.data.batches import call, rows, to_device
from launcher.memory.profile import is_oom
from launcher.models.outputs import logits_of
from launcher.planning.schedule import lr_at
from launcher.planning.split import shrink_micro_batch
from launcher.training.evaluation import Evaluations
from launcher.training.guard import (
    DIVERGED,
    NON_FINITE,
    OOM,
    SPIKE,
    Diverged,
    diverged_message,
    non_finite_message,
)
from launcher.training.metrics import MetricsSink
from launcher.types.backend import Backend
from launcher.types.bundles import Feed, Hooks, Loss, Settings, StepHealth, TokenLoss, Trainee
from launcher.types.plan import BatchPlan


def accumulate(
    t: Trainee,
    micro_batches: Iterator[Any],
    plan: BatchPlan,
    sync_in_backward: bool = True,
    before_micro_step: Callable[[int], None] | None = None,
    meter: NoiseMeter | None = None,
    split: bool = False,
) -> torch.Tensor:
    """Forward and backward over `plan.accumulation` micro-batches; returns this rank's mean loss
    (launcher/models/loss.py: one value per sample, a sequence's the mean over its positions).

    Gradients add up locally; with `sync_in_backward` the last backward also all-reduces them
    (DDP's overlapped reduction), otherwise the caller reduces them after checking every rank.
    `meter` reads the local gradient norms it needs after each backward; `split` runs each
    micro-batch as two halves (the noise meter's split mode; the same gradient). A loss per token
    counts the step's tokens over the ranks first (`_step_batches`: one host-side gather, before
    the micro-steps and any hook); its returned value is this rank's token sum x world size / the
    global count, whose mean over the ranks is the global batch's loss.
    """
    model, backend = t.model, t.backend
    total: torch.Tensor | None = None  # float64: the sum of the micro-steps' losses
    count = _count(micro_batches, plan)
    if count != plan.accumulation:  # token-budget micro-batches: the meter sees this step's
        plan = dataclasses.replace(plan, accumulation=count)
    batches, tokens = _step_batches(t, micro_batches, plan)
    token_loss = _token_loss(t.loss_fn) if tokens else None
    seen = 0.0  # samples (or counted tokens in samples) so far: the rank mode's piece
    if meter is not None and plan.noise == "split" and not split:
        meter = None  # split mode measures split steps only: nothing to read in this one
    for j in range(count):
        if before_micro_step is not None:
            before_micro_step(j)
        batch = next(batches)
        x, y = to_device(batch, backend.device, t.dtype)
        if len(y) != plan.micro_batch and not hasattr(micro_batches, "next_step"):
            raise RuntimeError(f"micro-batch of {len(y)} samples, the plan says {plan.micro_batch}")
        half = len(y) // 2
        pieces = (
            [(rows(x, 0, half), y[:half]), (rows(x, half, None), y[half:])] if split else [(x, y)]
        )
        for k, (xp, yp) in enumerate(pieces):
            last = j == plan.accumulation - 1 and k == len(pieces) - 1
            with nullcontext() if last and sync_in_backward else backend.no_sync(model):
                outputs = logits_of(call(model, xp))
                if token_loss is not None:
                    loss = token_loss.token_sum(outputs, yp) * (plan.world_size / tokens)
                else:
                    loss = t.loss_fn.sum(outputs, yp) / plan.per_device_batch
                del outputs
                backend.backward(loss)
            if meter is not None:
                size = _size(token_loss, batch, k if split else None, plan, tokens)
                seen += size
                meter.backward_done(model, plan, j, k, seen if plan.noise == "rank" else size)
            piece = loss.detach().to(torch.float64)
            total = piece if total is None else total + piece
    assert total is not None  # a step has at least one micro-batch
    return total


def _count(micro_batches: Iterator[Any], plan: BatchPlan) -> int:
    """The micro-batches of the next step: the plan's accumulation, or as many as a token
    budget made of it (launcher/data Budgeted)."""
    next_step = getattr(micro_batches, "next_step", None)
    return int(next_step()) if next_step is not None else plan.accumulation


def _step_batches(
    t: Trainee, micro_batches: Iterator[Any], plan: BatchPlan
) -> tuple[Iterator[Any], float]:
    """This step's micro-batches, and for a loss per token (sequence targets) the counted target
    tokens of its whole global batch (0.0: a loss per sample). To count them the step's
    `plan.accumulation` micro-batches are fetched first (host memory: the targets are counted on
    the host) and one host-side gather (`backend.flags`, gloo: no device sync, no GPU
    collective) sums the ranks' counts: on every rank alike (the targets' kind is the data's),
    before any forward, so none runs inside the micro-steps. The count is the step's, so a step
    rerun with another split (an out-of-memory re-split) normalises alike. A global batch without
    a counted token trains nothing (its loss and gradients are 0)."""
    first = next(micro_batches)
    if not t.loss_fn.per_token(torch.as_tensor(first[1])):
        return itertools.chain([first], micro_batches), 0.0
    step = [first, *(next(micro_batches) for _ in range(plan.accumulation - 1))]
    local = sum(_token_loss(t.loss_fn).counted(torch.as_tensor(b[1])) for b in step)
    return iter(step), float(max(sum(t.backend.flags(local)), 1))


def _token_loss(loss_fn: Loss) -> TokenLoss:
    """A loss whose `per_token` said yes: a loss per token, as the Loss protocol promises (a
    cast, not a check: the test hook's wrapper passes `counted` on through __getattr__)."""
    return cast(TokenLoss, loss_fn)


def _size(
    token_loss: TokenLoss | None, batch: Any, half: int | None, plan: BatchPlan, tokens: float
) -> float:
    """A piece's size in samples for the noise meter (launcher/batchsize/meter.py): the micro-batch
    or its half `half` (0, 1); for a loss per token (`token_loss`, over `tokens` counted in the
    global batch) its counted tokens in samples of the global batch's mean counted length, which
    its loss weighs it as (its samples, with no ignored target)."""
    y = torch.as_tensor(batch[1])
    if half is not None:
        y = y[: len(y) // 2] if half == 0 else y[len(y) // 2 :]
    if token_loss is None:
        return len(y)
    return token_loss.counted(y) * plan.global_batch / tokens


def train_step(
    t: Trainee,
    micro_batches: Iterator[Any],
    plan: BatchPlan,
    meter: NoiseMeter | None = None,
    split: bool = False,
    settings: Settings | None = None,
) -> torch.Tensor | Skipped | list[int]:
    """One optimizer step over `plan.accumulation` micro-batches, DDP's overlapped reduction;
    returns this rank's mean loss, or Skipped (not applied) when the health check flags it on
    any rank (the type's list of ranks out of memory: never here, an error ends the run)."""
    total = accumulate(t, micro_batches, plan, meter=meter, split=split)
    return _checked(t, plan, meter, total, settings)


class Skipped:
    """A step that was not applied: its flag bits on each rank (guard.py)."""

    def __init__(self, flags: list[int], loss: torch.Tensor | None = None) -> None:
        self.flags = flags
        self.loss = loss  # a spike that was applied all the same: its loss, else None

    @property
    def applied(self) -> bool:
        return self.loss is not None

    def ranks(self, bit: int) -> list[int]:
        return [r for r, f in enumerate(self.flags) if f & bit]


def _checked(
    t: Trainee,
    plan: BatchPlan,
    meter: NoiseMeter | None,
    loss: torch.Tensor | None,
    settings: Settings | None,
) -> torch.Tensor | Skipped | list[int]:
    """Gather every rank's flag (out of memory, non-finite, spike) and apply the step only if
    none forbids it. `loss` None: this rank ran out of memory. Returns the loss, Skipped, or the
    ranks that ran out of memory."""
    model, backend = t.model, t.backend
    health = settings.health if settings is not None else None
    bits = OOM if loss is None else 0
    if loss is not None and health is not None:
        bits = health.bits(loss, model, check_grads=backend.gradient_scale() == 1.0)
    flags = backend.flags(bits)
    if loss is None or any(f & OOM for f in flags):  # this rank's own flag has OOM if None
        return [r for r, f in enumerate(flags) if f & OOM]
    skip_spikes = settings is not None and settings.skip_spikes
    forbid = NON_FINITE | DIVERGED | (SPIKE if skip_spikes else 0)
    if any(f & forbid for f in flags):
        backend.drop_gradients(model, t.optimizer)
        if meter is not None:
            meter.dropped()
        return Skipped(flags)
    backend.reduce_gradients(model)
    # one rank: nothing was reduced, the health check's gradient norms are this step's
    norms = health.norms if health is not None and backend.world_size == 1 else None
    if meter is not None:
        meter.reduced(model, plan, norms)
    backend.step(model, t.optimizer, norms)
    backend.sync_buffers(model)
    if health is not None:
        health.applied()
    return Skipped(flags, loss) if any(flags) else loss


def _step_or_oom(
    t: Trainee,
    batches: Iterator[Any],
    plan: BatchPlan,
    step: int,
    meter: NoiseMeter | None,
    split: bool,
    settings: Settings,
) -> torch.Tensor | Skipped | list[int]:
    """One step whose gradients are reduced only once every rank got through its micro-steps.

    Returns the loss, the list of ranks that ran out of memory (then every rank has dropped
    its partial gradients and no optimizer step was taken), or Skipped (guard.py). No collective
    runs inside the micro-steps, so a rank that fails cannot leave the others waiting.
    """
    hook = faults.test_oom_hook(t.backend.rank, step, plan)
    t.backend.begin_deferred_step(t.model)
    loss: torch.Tensor | None
    try:
        loss = accumulate(t, batches, plan, False, hook, meter, split)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_oom(exc):  # out of memory however the limit is imposed (profile.is_oom)
            raise
        loss = None
    outcome = _checked(t, plan, meter, loss, settings)
    if isinstance(outcome, list):  # out of memory on these ranks: drop the partial step
        t.backend.drop_gradients(t.model, t.optimizer)
        if meter is not None:
            meter.dropped()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return outcome


class _Position:
    """Where the loop is: the run's plan, the plan of the stretch being trained (a ramp-up
    stage, an out-of-memory re-split, an adaptive stage) and its micro-batch stream."""

    def __init__(self, t: Trainee, feed: Feed, plan: BatchPlan, step: int) -> None:
        self.t, self.feed, self.plan, self.step = t, feed, plan, step
        self.current = plan.at(step)  # a ramp-up stage, or the plan
        if self.current is not plan:
            t.backend.replan(t.model, self.current)
        self.waited = 0.0  # seconds the loop waited on its micro-batches (the input pipeline)
        self.logged = (0.0, 0.0)  # (waited, train seconds) at the last metrics line
        self.batches = _Timed(feed.train(self.current, step), self)

    def switch(self, current: BatchPlan) -> None:
        """Train on with `current`: the backend re-planned, a new stream from this step."""
        self.current = current
        self.t.backend.replan(self.t.model, current)
        self.batches = _Timed(self.feed.train(current, self.step), self)

    def wait_share(self, train_s: float) -> float | None:
        """The share of the training time since the last call that the loop spent waiting for
        micro-batches (None: no time passed)."""
        waited, before = self.waited - self.logged[0], train_s - self.logged[1]
        self.logged = (self.waited, train_s)
        return waited / before if before > 0 else None


class _Timed:
    """A micro-batch stream whose waits the loop counts (`at.waited`); a token budget's
    `next_step` and `padding` (launcher/data Budgeted) pass through."""

    def __init__(self, batches: Iterable[Any], at: _Position) -> None:
        self.batches, self.at = iter(batches), at

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.at.waited += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        if name == "batches":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.batches, name)


def _one_step(
    t: Trainee, at: _Position, meter: NoiseMeter | None, settings: Settings
) -> tuple[torch.Tensor | Skipped | list[int], float]:
    """The step at `at.step` with the LR the schedule gives there: (its loss, Skipped, or the
    ranks that ran out of memory; the LR)."""
    lr = lr_at(at.current, at.current.samples_at(at.step))
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    split = meter is not None and meter.start_step(at.step, at.current)
    loss_fn = faults.test_loss_hook(t.backend.rank, at.step + 1, t.loss_fn)
    if loss_fn is not t.loss_fn:
        t = dataclasses.replace(t, loss_fn=loss_fn)
    if not settings.oom_recovery:
        return train_step(t, at.batches, at.current, meter, split, settings), lr
    return _step_or_oom(t, at.batches, at.current, at.step, meter, split, settings), lr


NO_HOOKS = Hooks()


def fit(
    t: Trainee,
    plan: BatchPlan,
    feed: Feed,
    sink: MetricsSink,
    settings: Settings,
    *,
    start_step: int = 0,
    meter: NoiseMeter | None = None,
    hooks: Hooks = NO_HOOKS,
) -> tuple[dict[str, float], BatchPlan]:
    """Train from `start_step` to `plan.end_step` (`plan.steps`, or an early stop); returns the
    final evaluation and the final plan. `meter` measures the gradient noise scale
    (launcher/batchsize/meter.py), logged with the loss; evaluation uses the training loss
    without label smoothing.

    A ramp-up (plan.ramp) trains each stage's steps with its batch, micro-batch and LR, then
    re-plans the backend and the sample stream at the next stage's first step. An adaptive ramp
    (launcher/planning/adaptive.py, `hooks.grow`) may switch to a larger batch after a log step;
    it takes over before `after_step`, so a checkpoint of that step holds it.

    With `settings.oom_recovery`, an out-of-memory error on any rank drops the partial step on
    every rank, halves the micro-batch, doubles the accumulation and reruns the same samples: the
    global batch, LR and schedule do not change. Without it, DDP's overlapped reduction is used
    and an out-of-memory error ends the run. Evaluation does not count as training time
    (`train_s`, samples/s); `after_step` pauses the sink itself while it saves.

    The health check (guard.py) looks at each step on every rank before it is applied: a
    non-finite loss or gradient skips the step (its samples are consumed, nothing learned) with a
    `non_finite` event, and `nonfinite_limit` of them in a row raise Diverged; a loss spike is a
    `loss_spike` event, and with `skip_spikes` the step is skipped too.
    """
    t.model.train()
    at = _Position(t, feed, plan, start_step)
    sink.start(start_step)
    at.logged = (0.0, sink.train_seconds())  # a resumed run's clock starts at its checkpoint's
    first = plan.samples_at(start_step)
    evals = Evaluations(t, feed, sink, first, settings.eval_every_samples)
    bad: list[int] = []  # the non-finite steps in a row
    while at.step < at.plan.end_step:
        if at.step >= at.current.steps:  # a ramp-up stage is over: the next batch
            at.switch(at.plan.at(at.step))
            sink.log({"event": "ramp", "step": at.step, "global_batch": at.current.global_batch})
        loss, lr = _one_step(t, at, meter, settings)
        if isinstance(loss, list):  # out of memory on these ranks: the same samples, re-split
            smaller = shrink_micro_batch(at.current, at.step, loss)
            if hooks.on_oom is not None:
                hooks.on_oom(at.current, smaller, at.step, loss)
            at.plan = smaller if at.current is at.plan else at.plan
            at.switch(smaller)
            continue
        at.step += 1
        step, end, samples = at.step, at.plan.end_step, at.current.samples_at(at.step)
        trained: torch.Tensor | None = loss if isinstance(loss, torch.Tensor) else None
        if isinstance(loss, Skipped):
            health = settings.health
            assert health is not None  # only the health check flags a step
            bad = [*bad, step] if loss.ranks(NON_FINITE) else []
            if loss.ranks(DIVERGED) and not loss.ranks(NON_FINITE):
                _stop(sink, step, samples, diverged_message(step, lr, health))
            _log_skipped(loss, step, samples, lr, health, sink, t.backend)
            if len(bad) >= settings.nonfinite_limit:
                _stop(sink, step, samples, non_finite_message(bad, lr, bad[0] - 1))
            trained = loss.loss  # None when skipped: no loss of it is logged
        else:
            bad = []
        logged = step % settings.log_every == 0 or step == end
        noise = None
        if logged and trained is not None:
            noise = _log(t, at, sink, meter, trained, lr, first)
        evals.maybe(at.current, step, samples, step == end)
        sink.advance()
        if hooks.grow is not None and logged and step < end:
            larger = hooks.grow(step, at.current, noise)
            if larger is not None:
                at.plan = larger
                at.switch(larger)
        if hooks.after_step is not None:
            hooks.after_step(step, at.plan)
    return evals.result or evals.run(at.plan), at.plan


def _log(
    t: Trainee,
    at: _Position,
    sink: MetricsSink,
    meter: NoiseMeter | None,
    loss: torch.Tensor,
    lr: float,
    first: int,
) -> float | None:
    """The step's metrics line (loss averaged over ranks, throughput, the noise meter's
    measurements); returns the noise scale it measured, if any."""
    samples = at.current.samples_at(at.step)
    record = {
        "step": at.step,
        "samples": samples,
        "epoch": samples / at.plan.epoch_samples,
        "global_batch": at.current.global_batch,
        "loss": float(t.backend.sum(loss)) / at.plan.world_size,
        "lr": lr,
        "samples_per_s": sink.samples_per_second(samples - first),
        "train_s": sink.train_seconds(),
    }
    wait = at.wait_share(record["train_s"])
    if wait is not None:  # the input pipeline: the share of the time spent waiting for data
        record["data_wait"] = wait
    measured = meter.flush() if meter is not None else {}
    padding = getattr(at.batches, "padding", None)
    share = padding() if padding is not None else None
    if share is not None:  # token-budget micro-batches: the padding they carried
        measured["padding_fraction"] = share
    sink.log(record | measured)
    return measured.get("noise_scale")


def _stop(sink: MetricsSink, step: int, samples: int, message: str) -> NoReturn:
    """End a run that diverged: a `diverged` event (no advice is given from such a run), then
    Diverged with its one line."""
    sink.log({"event": "diverged", "step": step, "samples": samples, "why": message})
    raise Diverged(message)


def _log_skipped(
    outcome: Skipped,
    step: int,
    samples: int,
    lr: float,
    health: StepHealth,
    sink: MetricsSink,
    backend: Backend,
) -> None:
    """The event of a step that a rank flagged (guard.py), and a line on rank 0's stderr."""
    non_finite = outcome.ranks(NON_FINITE)
    kind = "non_finite" if non_finite else "loss_spike"
    ranks = non_finite or outcome.ranks(SPIKE)
    event = {"event": kind, "step": step, "samples": samples, "ranks": ranks, "lr": lr}
    event |= {"rank0_loss": health.loss, "rank0_recent_mean": health.mean}
    event["skipped"] = not outcome.applied
    sink.log(event)
    if backend.rank == 0:
        what = (
            "non-finite loss or gradients"
            if non_finite
            else f"loss spike ({health.loss:.4g} vs a recent mean of {health.mean:.4g})"
        )
        done = "step applied" if outcome.applied else "step skipped: its samples are not learned"
        log.warn(f"launcher: {what} at step {step:,} on rank(s) {ranks}; {done}")

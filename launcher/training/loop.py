"""The training loop: micro-steps, accumulation, LR per step, evaluation, metrics.

It knows nothing of Hydra or DeepSpeed: it gets a built model and optimizer, the BatchPlan, a
backend and iterables of micro-batches. The loss is normalised by the global batch: each rank
sums its per-sample losses over `accumulation` micro-batches and divides by its per-device batch;
the backend's all-reduce then averages over ranks, which is the mean over the global batch.
"""

from __future__ import annotations

import gc
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from launcher.backends.base import Backend
from launcher.batchsize.meter import NoiseMeter
from launcher.planning.plan import BatchPlan, shrink_micro_batch
from launcher.planning.schedule import lr_at
from launcher.training.guard import (
    NON_FINITE,
    OOM,
    SPIKE,
    Diverged,
    Health,
    state_message,
    stop_message,
)
from launcher.training.loss import CrossEntropy, UserLoss
from launcher.training.metrics import MetricsSink

DEFAULT_LOSS = CrossEntropy()


def to_device(
    batch: Any, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if x.is_floating_point():
        x = x.to(dtype)
    return x, torch.as_tensor(y).to(device, non_blocking=True)


def accumulate(
    model: Any,
    micro_batches: Iterator[Any],
    backend: Backend,
    plan: BatchPlan,
    dtype: torch.dtype,
    sync_in_backward: bool = True,
    before_micro_step: Callable[[int], None] | None = None,
    meter: NoiseMeter | None = None,
    split: bool = False,
    loss_fn: CrossEntropy | UserLoss = DEFAULT_LOSS,
) -> torch.Tensor:
    """Forward and backward over `plan.accumulation` micro-batches; returns this rank's mean loss
    (launcher/training/loss.py: one value per sample, a sequence's the mean over its positions).

    Gradients add up locally; with `sync_in_backward` the last backward also all-reduces them
    (DDP's overlapped reduction), otherwise the caller reduces them after checking every rank.
    `meter` reads the local gradient norms it needs after each backward; `split` runs each
    micro-batch as two halves (the noise meter's split mode; the same gradient).
    """
    total = torch.zeros((), device=backend.device, dtype=torch.float64)
    for j in range(plan.accumulation):
        if before_micro_step is not None:
            before_micro_step(j)
        x, y = to_device(next(micro_batches), backend.device, dtype)
        if len(y) != plan.micro_batch:
            raise RuntimeError(f"micro-batch of {len(y)} samples, the plan says {plan.micro_batch}")
        half = len(y) // 2
        pieces = [(x[:half], y[:half]), (x[half:], y[half:])] if split else [(x, y)]
        for k, (xp, yp) in enumerate(pieces):
            last = j == plan.accumulation - 1 and k == len(pieces) - 1
            with nullcontext() if last and sync_in_backward else backend.no_sync(model):
                loss = loss_fn.sum(model(xp), yp) / plan.per_device_batch
                backend.backward(loss)
            if meter is not None:
                meter.backward_done(model, plan, j, k, len(yp))
            total += loss.detach()
    return total


def train_step(
    model: Any,
    optimizer: Any,
    micro_batches: Iterator[Any],
    backend: Backend,
    plan: BatchPlan,
    dtype: torch.dtype,
    meter: NoiseMeter | None = None,
    split: bool = False,
    loss_fn: CrossEntropy | UserLoss = DEFAULT_LOSS,
    health: Health | None = None,
    skip_spikes: bool = False,
) -> torch.Tensor | Skipped:
    """One optimizer step over `plan.accumulation` micro-batches; returns this rank's mean loss,
    or Skipped (not applied) when `health` flags it on any rank."""
    total = accumulate(
        model,
        micro_batches,
        backend,
        plan,
        dtype,
        meter=meter,
        split=split,
        loss_fn=loss_fn,
    )
    return _checked(model, optimizer, backend, plan, meter, total, 0, health, skip_spikes)


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


def _checked(  # noqa: ANN001
    model, optimizer, backend, plan, meter, loss, failed, health, skip_spikes
) -> torch.Tensor | Skipped | list[int]:
    """Gather every rank's flag (out of memory, non-finite, spike) and apply the step only if
    none forbids it. Returns the loss, Skipped, or the ranks that ran out of memory."""
    bits = failed
    if not failed and health is not None:
        bits = health.bits(loss, model, check_grads=backend.gradient_scale() == 1.0)
    flags = backend.flags(bits)
    if any(f & OOM for f in flags):
        return [r for r, f in enumerate(flags) if f & OOM]
    forbid = NON_FINITE | (SPIKE if skip_spikes else 0)
    if any(f & forbid for f in flags):
        backend.drop_gradients(model, optimizer)
        if meter is not None:
            meter.dropped()
        return Skipped(flags)
    backend.reduce_gradients(model)
    _apply(model, optimizer, backend, plan, meter)
    if health is not None:
        health.applied()
    return Skipped(flags, loss) if any(flags) else loss


def _apply(model, optimizer, backend, plan, meter) -> None:  # noqa: ANN001
    """The end of a step whose gradients are all-reduced: measure, step, sync the buffers."""
    if meter is not None:
        meter.reduced(model, plan)
    backend.step(model, optimizer)
    backend.sync_buffers(model)


@torch.no_grad()
def evaluate(
    model: Any,
    batches: Iterable[Any],
    backend: Backend,
    dtype: torch.dtype,
    loss_fn: CrossEntropy | UserLoss = DEFAULT_LOSS,
) -> dict[str, float]:
    """Accuracy and mean loss over the whole eval split (each rank holds a disjoint shard); per
    token for sequences, no label smoothing. With your loss: its mean per sample, and accuracy
    only where the outputs are class scores of integer targets (else no eval_accuracy)."""
    model.eval()
    sums = torch.zeros(5, device=backend.device, dtype=torch.float64)
    for batch in batches:  # correct, predictions, loss, loss count, samples
        x, y = to_device(batch, backend.device, dtype)
        sums[:4] += loss_fn.eval_counts(model(x), y)
        sums[4] += len(y)
    model.train()
    correct, predictions, loss, count, samples = backend.sum(sums).tolist()
    result = {"eval_loss": loss / count, "eval_samples": int(samples)}
    if predictions:
        result["eval_accuracy"] = correct / predictions
    return result


OOM_ERRORS = (torch.OutOfMemoryError,)


def _test_oom_hook(rank: int, step: int, plan: BatchPlan) -> Callable[[int], None] | None:
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
        if j == plan.accumulation - 1:
            raise torch.OutOfMemoryError(f"LAUNCHER_TEST_OOM={spec}: injected at step {step}")

    return hook


class _Scaled:
    """A loss times a factor (the LAUNCHER_TEST_LOSS hook)."""

    def __init__(self, loss_fn: Any, factor: float) -> None:
        self.loss_fn, self.factor = loss_fn, factor

    def sum(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn.sum(outputs, y) * self.factor


def _test_loss_hook(rank: int, step: int, loss_fn: Any) -> Any:
    """Test hook: LAUNCHER_TEST_LOSS=RANK:STEP:FACTOR[,...] multiplies that rank's loss (and so
    its gradients) at optimizer step STEP (1-based) by FACTOR (nan and inf allowed): a stand-in
    for a batch that blows up."""
    for item in filter(None, os.environ.get("LAUNCHER_TEST_LOSS", "").split(",")):
        at_rank, at_step, factor = item.split(":")
        if int(at_rank) == rank and int(at_step) == step:
            return _Scaled(loss_fn, float(factor))
    return loss_fn


def _step_or_oom(  # noqa: ANN001
    model, optimizer, batches, backend, plan, dtype, step, meter, split, loss_fn, health, skip
):
    """One step whose gradients are reduced only once every rank got through its micro-steps.

    Returns the loss, the list of ranks that ran out of memory (then every rank has dropped
    its partial gradients and no optimizer step was taken), or Skipped (guard.py). No collective
    runs inside the micro-steps, so a rank that fails cannot leave the others waiting.
    """
    try:
        loss = accumulate(
            model,
            batches,
            backend,
            plan,
            dtype,
            sync_in_backward=False,
            before_micro_step=_test_oom_hook(backend.rank, step, plan),
            meter=meter,
            split=split,
            loss_fn=loss_fn,
        )
        failed = 0
    except OOM_ERRORS:
        loss, failed = None, OOM
    outcome = _checked(model, optimizer, backend, plan, meter, loss, failed, health, skip)
    if isinstance(outcome, list):  # out of memory on these ranks: drop the partial step
        backend.drop_gradients(model, optimizer)
        if meter is not None:
            meter.dropped()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return outcome


def fit(
    model: Any,
    optimizer: Any,
    plan: BatchPlan,
    backend: Backend,
    batches_from: Callable[[BatchPlan, int], Iterable[Any]],
    eval_batches: Callable[[BatchPlan], Iterable[Any]],
    sink: MetricsSink,
    *,
    log_every: int,
    eval_every_samples: int,
    dtype: torch.dtype,
    start_step: int = 0,
    oom_recovery: bool = True,
    on_oom: Callable[[BatchPlan, BatchPlan, int, list[int]], None] | None = None,
    after_step: Callable[[int, BatchPlan], None] | None = None,
    meter: NoiseMeter | None = None,
    loss_fn: CrossEntropy | UserLoss = DEFAULT_LOSS,
    grow: Callable[[int, BatchPlan, float | None], BatchPlan | None] | None = None,
    health: Health | None = None,
    skip_spikes: bool = False,
    nonfinite_limit: int = 3,
) -> tuple[dict[str, float], BatchPlan]:
    """Train from `start_step` to `plan.end_step` (`plan.steps`, or an early stop); returns the
    final evaluation and the final plan.
    `after_step(step, plan)` runs after every completed step (checkpoints); `meter` measures the
    gradient noise scale (launcher/batchsize/meter.py), logged with the loss. `loss_fn`: the
    training loss (launcher/training/loss.py); evaluation uses it without label smoothing.

    A ramp-up (plan.ramp) trains each stage's steps with its batch, micro-batch and LR, then
    re-plans the backend and the sample stream at the next stage's first step. An adaptive ramp
    (launcher/planning/adaptive.py): after each log step `grow(step, plan, noise scale)` may return
    the plan of a larger batch from there on (a collective: every rank calls it at the same steps);
    it takes over before `after_step`, so a checkpoint of that step holds it.

    With `oom_recovery`, an out-of-memory error on any rank drops the partial step on every rank,
    halves the micro-batch, doubles the accumulation and reruns the same samples: the global
    batch, LR and schedule do not change. Without it, DDP's overlapped reduction is used and an
    out-of-memory error ends the run. Evaluation does not count as training time (`train_s`,
    samples/s); `after_step` pauses the sink itself while it saves.

    `health` (guard.py) checks each step on every rank before it is applied: a non-finite loss or
    gradient skips the step (its samples are consumed, nothing learned) with a `non_finite`
    event, and `nonfinite_limit` of them in a row raise Diverged; a loss spike is a `loss_spike`
    event, and with `skip_spikes` the step is skipped too.
    """
    model.train()
    plain = CrossEntropy() if isinstance(loss_fn, CrossEntropy) else loss_fn  # no smoothing
    current = plan.at(start_step)  # a ramp-up stage, or the plan
    if current is not plan:
        backend.replan(model, current)
    batches = iter(batches_from(current, start_step))
    sink.start(start_step)
    first = plan.samples_at(start_step)
    next_eval = (first // eval_every_samples + 1) * eval_every_samples
    result: dict[str, float] = {}
    step, end = start_step, plan.end_step
    bad: list[int] = []  # the non-finite steps in a row
    while step < end:
        if step >= current.steps:  # a ramp-up stage is over: the next batch
            current = plan.at(step)
            backend.replan(model, current)
            batches = iter(batches_from(current, step))
            sink.log({"event": "ramp", "step": step, "global_batch": current.global_batch})
        lr = lr_at(current, current.samples_at(step))
        for group in optimizer.param_groups:
            group["lr"] = lr
        split = meter is not None and meter.start_step(step, current)
        step_loss = _test_loss_hook(backend.rank, step + 1, loss_fn)
        parts = (model, optimizer, batches, backend, current, dtype)
        rest = (meter, split, step_loss, health, skip_spikes)
        if not oom_recovery:
            loss = train_step(*parts, *rest)
        else:
            loss = _step_or_oom(*parts, step, *rest)
            if isinstance(loss, list):
                smaller = shrink_micro_batch(current, step, loss)
                if on_oom is not None:
                    on_oom(current, smaller, step, loss)
                plan = smaller if current is plan else plan
                current = smaller
                backend.replan(model, current)
                batches = iter(batches_from(current, step))
                continue
        step += 1
        samples = current.samples_at(step)
        if isinstance(loss, Skipped):
            _log_skipped(loss, step, samples, lr, health, sink, backend)
            bad = [*bad, step] if loss.ranks(NON_FINITE) else []
            if len(bad) >= nonfinite_limit:
                raise Diverged(stop_message(bad, lr, bad[0] - 1))
            loss = loss.loss  # None when skipped: no loss of it is logged
        else:
            bad = []
        logged, noise = step % log_every == 0 or step == end, None
        if logged and loss is not None:
            record = {
                "step": step,
                "samples": samples,
                "epoch": samples / plan.epoch_samples,
                "global_batch": current.global_batch,
                "loss": float(backend.sum(loss)) / plan.world_size,
                "lr": lr,
                "samples_per_s": sink.samples_per_second(samples - first),
                "train_s": sink.train_seconds(),
            }
            measured = meter.flush() if meter is not None else {}
            noise = measured.get("noise_scale")
            sink.log(record | measured)
        if samples >= next_eval or step == end:
            _pause(sink, backend)
            result = evaluate(model, eval_batches(current), backend, dtype, plain)
            sink.resume()
            sink.log({"step": step, "samples": samples, **result, "train_s": sink.train_seconds()})
            next_eval = (samples // eval_every_samples + 1) * eval_every_samples
        sink.advance()
        if grow is not None and logged and step < end:
            larger = grow(step, current, noise)
            if larger is not None:
                plan = current = larger
                end = plan.end_step
                backend.replan(model, current)
                batches = iter(batches_from(current, step))
        if after_step is not None:
            after_step(step, plan)
    if not result:  # resumed from the final checkpoint: nothing left to train
        result = evaluate(model, eval_batches(plan), backend, dtype, plain)
    return result, plan


def _log_skipped(  # noqa: ANN001
    outcome: Skipped, step: int, samples: int, lr: float, health, sink, backend
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
        print(f"launcher: {what} at step {step:,} on rank(s) {ranks}; {done}", file=sys.stderr)


def _pause(sink: MetricsSink, backend: Backend) -> None:
    """Stop the training clock once the device has finished the queued training work."""
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    sink.pause()


def check_replicas(model: Any, backend: Backend, step: int) -> float:
    """Raise if the ranks' parameters or buffers (BatchNorm statistics, synced after every step)
    differ; returns the digest (float64 sum of squares). Call inside `backend.gathered`."""
    digest = torch.zeros(1, device=backend.device, dtype=torch.float64)
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        digest += t.detach().double().square().sum()
    every = backend.gather(digest).tolist()
    if not all(math.isfinite(d) for d in every):  # before "differ": NaN != NaN
        raise Diverged(state_message(step, "model_final.pt"))
    if any(d != every[0] for d in every):
        raise RuntimeError(f"replicas differ across ranks after training: digests {every}")
    return every[0]

"""Evaluation, off the training clock: on the whole eval split every `every` samples and at
the end (accuracy and mean loss, per token for sequences); and the replica check at the end of a
run (every rank holds the same parameters and buffers)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from launcher.data.batches import call, rows, to_device
from launcher.models.loss import CrossEntropy
from launcher.models.outputs import logits_of
from launcher.training.guard import Diverged, state_message
from launcher.training.metrics import MetricsSink
from launcher.types.backend import Backend
from launcher.types.bundles import Feed, Loss, Trainee
from launcher.types.plan import BatchPlan

DEFAULT_LOSS = CrossEntropy()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    backend: Backend,
    dtype: torch.dtype,
    loss_fn: Loss = DEFAULT_LOSS,
) -> dict[str, float]:
    """Accuracy and mean loss over the whole eval split (each rank holds a disjoint shard); per
    token for sequences, no label smoothing. With your loss: its mean per sample, and accuracy
    only where the outputs are class scores of integer targets (else no eval_accuracy)."""
    model.eval()
    sums = torch.zeros(5, device=backend.device, dtype=torch.float64)
    x, n = None, 0
    for batch in batches:  # correct, predictions, loss, loss count, samples
        n += 1
        x, y = to_device(batch, backend.device, dtype)
        sums[:4] += loss_fn.eval_counts(logits_of(call(model, x)), y)
        sums[4] += len(y)
    # A sharded model (FSDP2, ZeRO 3) gathers parameters in every forward: a rank with fewer
    # eval batches runs uncounted forwards until every rank has run as many
    extra = -backend.all_min(-n) - n
    for _ in range(extra if x is not None else 0):
        call(model, rows(x, 0, 1))
    model.train()
    correct, predictions, loss, count, samples = backend.sum(sums).tolist()
    result = {"eval_loss": loss / count, "eval_samples": int(samples)}
    if predictions:
        result["eval_accuracy"] = correct / predictions
    return result


class Evaluations:
    """Evaluation every `every` samples and at the end, off the training clock; `result` is the
    latest one ({} before the first)."""

    def __init__(self, t: Trainee, feed: Feed, sink: MetricsSink, first: int, every: int) -> None:
        self.t, self.feed, self.sink, self.every = t, feed, sink, every
        self.plain: Loss = CrossEntropy() if isinstance(t.loss_fn, CrossEntropy) else t.loss_fn
        self.next = (first // every + 1) * every
        self.result: dict[str, float] = {}

    def run(self, plan: BatchPlan) -> dict[str, float]:
        t = self.t
        return evaluate(t.model, self.feed.evaluation(plan), t.backend, t.dtype, self.plain)

    def maybe(self, plan: BatchPlan, step: int, samples: int, last: bool) -> None:
        """Evaluate if `samples` reached the next evaluation, or at the `last` step."""
        if samples < self.next and not last:
            return
        _pause(self.sink, self.t.backend)
        self.result = self.run(plan)
        self.sink.resume()
        train_s = self.sink.train_seconds()
        self.sink.log({"step": step, "samples": samples, **self.result, "train_s": train_s})
        self.next = (samples // self.every + 1) * self.every


def _pause(sink: MetricsSink, backend: Backend) -> None:
    """Stop the training clock once the device has finished the queued training work."""
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    sink.pause()


def check_replicas(model: torch.nn.Module, backend: Backend, step: int) -> float:
    """Raise if the ranks' parameters or buffers (BatchNorm statistics, synced after every step)
    differ; returns the digest (float64 sum of squares). Call inside `backend.gathered`."""
    digest = torch.zeros(1, device=backend.device, dtype=torch.float64)
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:  # a sharded parameter (DTensor) is gathered whole, every rank alike
        whole = t.full_tensor() if hasattr(t, "full_tensor") else t
        digest += whole.detach().double().square().sum()
    every = backend.gather(digest).tolist()
    if not all(math.isfinite(d) for d in every):  # before "differ": NaN != NaN
        raise Diverged(state_message(step, "model_final.pt"))
    if any(d != every[0] for d in every):
        raise RuntimeError(f"replicas differ across ranks after training: digests {every}")
    return float(every[0])

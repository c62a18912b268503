"""The training loop: micro-steps, accumulation, LR per step, evaluation, metrics.

It knows nothing of Hydra or DeepSpeed: it gets a built model and optimizer, the BatchPlan, a
backend and iterables of micro-batches. The loss is normalised by the global batch: each rank
sums its per-sample losses over `accumulation` micro-batches and divides by its per-device batch;
the backend's all-reduce then averages over ranks, which is the mean over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from launcher.backends.base import Backend
from launcher.metrics import MetricsSink
from launcher.plan import BatchPlan
from launcher.schedule import lr_at


def to_device(
    batch: Any, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if x.is_floating_point():
        x = x.to(dtype)
    return x, torch.as_tensor(y).to(device, non_blocking=True)


def train_step(
    model: Any,
    optimizer: Any,
    micro_batches: Iterator[Any],
    backend: Backend,
    plan: BatchPlan,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One optimizer step over `plan.accumulation` micro-batches; returns this rank's mean loss."""
    total = torch.zeros((), device=backend.device, dtype=torch.float64)
    for j in range(plan.accumulation):
        x, y = to_device(next(micro_batches), backend.device, dtype)
        if len(y) != plan.micro_batch:
            raise RuntimeError(f"micro-batch of {len(y)} samples, the plan says {plan.micro_batch}")
        last = j == plan.accumulation - 1
        with nullcontext() if last else backend.no_sync(model):
            loss = F.cross_entropy(model(x), y, reduction="sum") / plan.per_device_batch
            backend.backward(loss)
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(
    model: Any, batches: Iterable[Any], backend: Backend, dtype: torch.dtype
) -> dict[str, float]:
    """Accuracy and mean loss over the whole eval split (each rank holds a disjoint shard)."""
    model.eval()
    sums = torch.zeros(3, device=backend.device, dtype=torch.float64)  # correct, loss, count
    for batch in batches:
        x, y = to_device(batch, backend.device, dtype)
        logits = model(x)
        sums[0] += (logits.argmax(dim=1) == y).sum()
        sums[1] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[2] += len(y)
    model.train()
    correct, loss, count = backend.sum(sums).tolist()
    return {"eval_accuracy": correct / count, "eval_loss": loss / count, "eval_samples": int(count)}


def fit(
    model: Any,
    optimizer: Any,
    plan: BatchPlan,
    backend: Backend,
    train_batches: Iterable[Any],
    eval_batches: Callable[[], Iterable[Any]],
    sink: MetricsSink,
    *,
    log_every: int,
    eval_every_samples: int,
    dtype: torch.dtype,
    start_step: int = 0,
) -> dict[str, float]:
    """Train from `start_step` to `plan.steps`; returns the final evaluation."""
    model.train()
    batches = iter(train_batches)
    sink.start(start_step)
    next_eval = (start_step * plan.global_batch // eval_every_samples + 1) * eval_every_samples
    result: dict[str, float] = {}
    for step in range(start_step, plan.steps):
        lr = lr_at(plan, step * plan.global_batch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, optimizer, batches, backend, plan, dtype)
        done, samples = step + 1, (step + 1) * plan.global_batch
        if done % log_every == 0 or done == plan.steps:
            mean_loss = float(backend.sum(loss)) / plan.world_size
            sink.log(
                {
                    "step": done,
                    "samples": samples,
                    "epoch": samples / plan.epoch_samples,
                    "loss": mean_loss,
                    "lr": lr,
                    "samples_per_s": sink.samples_per_second(done),
                }
            )
        if samples >= next_eval or done == plan.steps:
            result = evaluate(model, eval_batches(), backend, dtype)
            sink.log({"step": done, "samples": samples, **result})
            next_eval = (samples // eval_every_samples + 1) * eval_every_samples
        sink.advance()
    return result


def check_replicas(model: Any, backend: Backend) -> float:
    """Raise if the ranks' parameters differ; returns the digest (float64 sum of squares)."""
    digest = torch.zeros(1, device=backend.device, dtype=torch.float64)
    for p in model.parameters():
        digest += p.detach().double().square().sum()
    every = backend.gather(digest).tolist()
    if any(d != every[0] for d in every):
        raise RuntimeError(f"parameters differ across ranks after training: digests {every}")
    return every[0]

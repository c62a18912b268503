"""Seconds per training micro-step at several micro-batch sizes, measured on the run's own model
and device once training is done: the throughput curve of the batch-size advice (Pollux fits a
model of it; here it is measured).

A micro-step is what the loop does per micro-batch: forward, loss, backward (with the run's
precision, autocast and loss scaling), on the plain module (no DDP: no collective, so rank 0 runs
it alone). Sizes: the powers of two from 2 up to the largest micro-batch the plan allows (memory
cap and max_micro_batch), and the plan's own micro-batch; for each, one warm-up micro-step, then
the median of `repeats` (each repeat is logged too: their range is part of the advice's spread,
spread.py). The gradients are dropped and the buffers (BatchNorm statistics) put back
afterwards, so the trained model is left as it was. An out-of-memory error ends the ladder there
(said in the result, never skipped silently).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from launcher.data import as_source, first_samples
from launcher.data.batches import call, rows, to_device
from launcher.memory.profile import is_oom
from launcher.models.outputs import logits_of
from launcher.types.backend import Backend
from launcher.types.bundles import Loss
from launcher.types.plan import BatchPlan


def ladder(micro: int, largest: int) -> list[int]:
    """2, 4, 8, ... up to `largest`, and `micro` (BatchNorm cannot train on one sample, so a
    micro-batch of 1 is timed only when the plan uses it)."""
    sizes, size = {micro}, 2
    while size <= largest:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def largest_micro(plan: BatchPlan, max_micro_batch: int, samples: int) -> int:
    """The largest micro-batch the plan's caps allow (the measured memory cap, if any, and
    max_micro_batch), within the `samples` of the training split."""
    cap = plan.memory.get("cap", plan.micro_batch) if plan.memory else plan.micro_batch
    return min(max(plan.micro_batch, min(cap, max_micro_batch)), samples)


def time_micro_steps(
    model: torch.nn.Module,
    backend: Backend,
    source: Any,
    sizes: list[int],
    dtype: torch.dtype,
    loss_fn: Loss,
    repeats: int = 3,
) -> dict[str, Any]:
    """{"micro_step_seconds": {size: median seconds per micro-step},
    "micro_step_repeats": {size: the seconds of each repeat},
    "micro_step_out_of_memory_at": size or None} (a metrics line)."""
    module = backend.unwrap(model)
    n = max(sizes)  # samples repeat when the split is smaller: the time is what is measured
    x, y = first_samples(as_source(source), n)
    kept = {name: b.detach().clone() for name, b in module.named_buffers()}
    cuda = backend.device.type == "cuda"
    seconds: dict[int, float] = {}
    timed: dict[int, list[float]] = {}
    failed = None
    try:
        for size in sizes:
            xb, yb = to_device((rows(x, 0, size), y[:size]), backend.device, dtype)
            runs = []
            for _ in range(1 + repeats):
                if cuda:
                    torch.cuda.synchronize(backend.device)
                start = time.perf_counter()
                loss = loss_fn.sum(logits_of(call(module, xb)), yb) / size
                backend.backward(loss)
                if cuda:
                    torch.cuda.synchronize(backend.device)
                runs.append(time.perf_counter() - start)
                for p in module.parameters():
                    p.grad = None
            timed[size] = runs[1:]
            seconds[size] = statistics.median(runs[1:])
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_oom(exc):
            raise
        failed = size
        for p in module.parameters():
            p.grad = None
        if cuda:
            torch.cuda.empty_cache()
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(kept[name])
    return {
        "micro_step_seconds": {str(k): v for k, v in seconds.items()},
        "micro_step_repeats": {str(k): v for k, v in timed.items()},
        "micro_step_out_of_memory_at": failed,
    }

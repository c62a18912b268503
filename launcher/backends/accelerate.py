"""Accelerate backend: DDP (gloo on CPU, NCCL on GPU) and autocast through `accelerate`.

Accumulation is driven by the loop (Accelerator's own accumulation counter is not used): the plan
says how many micro-steps make a step, and `no_sync` skips the all-reduce for all but the last.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from launcher.backends.collectives import Collectives, flat_in_place
from launcher.config.schema import RunConfig, require_concrete
from launcher.types.plan import BatchPlan


class AccelerateBackend(Collectives):
    def __init__(self, cfg: RunConfig, device: str) -> None:
        from accelerate import Accelerator

        require_concrete(cfg.backend, cfg.trainer)
        self.acc = Accelerator(cpu=device == "cpu", mixed_precision=cfg.backend.mixed_precision)
        self.clip = cfg.optim.clip_grad_norm
        self.world_size = self.acc.num_processes
        self.rank = self.acc.process_index
        self.device = self.acc.device

    def prepare(self, model: torch.nn.Module, optimizer: Any, plan: BatchPlan) -> tuple[Any, Any]:
        return self.acc.prepare(model, optimizer)

    def replan(self, model: Any, plan: BatchPlan) -> None:
        """Nothing to tell: the loop drives accumulation."""

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # autocast casts inside the forward

    def unwrap(self, model: Any) -> torch.nn.Module:
        # Accelerator.unwrap_model imports deepspeed (seconds) just to rule it out; DDP is all here
        return (
            model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        )

    def state_dict(self, model: Any) -> dict[str, torch.Tensor]:
        return self.unwrap(model).state_dict()

    def optimizer_state(self, model: Any, optimizer: Any) -> dict[str, Any]:
        return optimizer.state_dict()  # replicated: the same, whole, on every rank

    def load_state(
        self, model: Any, optimizer: Any, weights: dict[str, Any], opt_state: dict[str, Any]
    ) -> None:
        self.unwrap(model).load_state_dict(weights)
        optimizer.load_state_dict(opt_state)

    def gathered(self, model: Any) -> AbstractContextManager:
        return nullcontext()  # every rank holds all parameters

    def begin_deferred_step(self, model: Any) -> None:
        """Nothing: no collective runs before the gradient reduction."""

    def no_sync(self, model: Any) -> AbstractContextManager:
        return self.acc.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def gradient_scale(self) -> float:
        scaler = self.acc.scaler  # fp16 only: GradScaler unscales in clip or step
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def reduce_gradients(self, model: Any) -> None:
        """Average the gradients over ranks (for steps whose backward ran without DDP's sync)."""
        if self.world_size > 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat_in_place(grads, torch.distributed.all_reduce)
            for g in grads:
                g.div_(self.world_size)

    def step(self, model: Any, optimizer: Any) -> None:
        if self.clip:
            self.acc.clip_grad_norm_(model.parameters(), self.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def drop_gradients(self, model: Any, optimizer: Any) -> None:
        optimizer.zero_grad(set_to_none=True)

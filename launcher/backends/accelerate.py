"""Accelerate backend: DDP (gloo on CPU, NCCL on GPU) and autocast through `accelerate`.

Accumulation is driven by the loop (Accelerator's own accumulation counter is not used): the plan
says how many micro-steps make a step, and `no_sync` skips the all-reduce for all but the last.
Accelerate ships no type information: what the Accelerator returns is Any here, and is typed
where it is handed on.

Where Accelerate's per-step wrappers reduce to the plain call (`direct`: no fp16 GradScaler, a
DDP/CPU/single-device setup, its own accumulation counter at 1), the step calls torch itself:
`Accelerator.backward` then only divides the loss by 1 (one more op forward and backward),
`AcceleratedOptimizer.step` looks the `lomo_optim` package up on disk twice per call
(`importlib.util.find_spec`, uncached) and `zero_grad` reads the optimizer's signature. Together
0.23 ms of a 5.6 ms step on the bench's CPU run (bench/README.md, "Loop overhead (issue 33)").
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
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
        from accelerate.utils import DistributedType

        plain_kinds = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        self.direct = (
            self.acc.scaler is None
            and self.acc.distributed_type in plain_kinds
            and self.acc.gradient_accumulation_steps == 1
        )

    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: BatchPlan
    ) -> tuple[torch.nn.Module, Any]:
        prepared: tuple[torch.nn.Module, Any] = self.acc.prepare(model, optimizer)
        return prepared

    def replan(self, model: torch.nn.Module, plan: BatchPlan) -> None:
        """Nothing to tell: the loop drives accumulation."""

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # autocast casts inside the forward

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # Accelerator.unwrap_model imports deepspeed (seconds) just to rule it out; DDP is all here
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            module: torch.nn.Module = model.module
            return module
        return model

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self.unwrap(model).state_dict()

    def optimizer_state(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        state: dict[str, Any] = optimizer.state_dict()  # replicated: whole on every rank
        return state

    def load_state(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        weights: dict[str, Any],
        opt_state: dict[str, Any],
    ) -> None:
        self.unwrap(model).load_state_dict(weights)
        optimizer.load_state_dict(opt_state)

    def save_shards(
        self, model: torch.nn.Module, optimizer: Any, folder: Path
    ) -> dict[str, list[Any]] | None:
        raise NotImplementedError("backend=accelerate writes whole checkpoints (optimizer_state)")

    def load_shards(
        self, model: torch.nn.Module, optimizer: Any, folder: Path, files: list[str]
    ) -> None:
        raise NotImplementedError("backend=accelerate loads whole checkpoints (load_state)")

    def gathered(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        return nullcontext()  # every rank holds all parameters

    def begin_deferred_step(self, model: torch.nn.Module) -> None:
        """Nothing: no collective runs before the gradient reduction."""

    def no_sync(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        if self.world_size == 1:  # Accelerate's answer too, after building its state per call
            return nullcontext()
        skipped: AbstractContextManager[None] = self.acc.no_sync(model)
        return skipped

    def backward(self, loss: torch.Tensor) -> None:
        if self.direct:
            torch.autograd.backward(loss)  # what loss.backward() calls
        else:
            self.acc.backward(loss)

    def gradient_scale(self) -> float:
        scaler = self.acc.scaler  # fp16 only: GradScaler unscales in clip or step
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Average the gradients over ranks (for steps whose backward ran without DDP's sync)."""
        if self.world_size > 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat_in_place(grads, torch.distributed.all_reduce)
            for g in grads:
                g.div_(self.world_size)

    def step(
        self, model: torch.nn.Module, optimizer: Any, norms: torch.Tensor | None = None
    ) -> None:
        if self.direct:  # what Accelerate's clip, step and zero_grad come to here
            inner = getattr(optimizer, "optimizer", optimizer)  # inside AcceleratedOptimizer
            if self.clip:
                clip(list(model.parameters()), self.clip, norms)
            inner.step()
            inner.zero_grad(set_to_none=True)
            return
        if self.clip:  # fp16: Accelerate unscales the gradients first
            self.acc.clip_grad_norm_(model.parameters(), self.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def drop_gradients(self, model: torch.nn.Module, optimizer: Any) -> None:
        optimizer.zero_grad(set_to_none=True)


def clip(parameters: list[torch.nn.Parameter], most: float, norms: torch.Tensor | None) -> None:
    """torch.nn.utils.clip_grad_norm_ (2-norm); given the gradients' per-tensor `norms`, their
    total is taken from those: torch takes it the same way, the vector norm of the per-tensor
    norms (grouped by device and dtype; one group, as usual, gives the same bits)."""
    if norms is None:
        torch.nn.utils.clip_grad_norm_(parameters, most)
    else:
        torch.nn.utils.clip_grads_with_norm_(parameters, most, torch.linalg.vector_norm(norms))

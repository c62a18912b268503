"""Accelerate backend: DDP (gloo on CPU, NCCL on GPU) and autocast through `accelerate`.

Accumulation is driven by the loop (Accelerator's own accumulation counter is not used): the plan
says how many micro-steps make a step, and `no_sync` skips the all-reduce for all but the last.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from launcher.config import BackendConfig


class AccelerateBackend:
    def __init__(self, cfg: BackendConfig, device: str) -> None:
        from accelerate import Accelerator

        self.acc = Accelerator(cpu=device == "cpu", mixed_precision=cfg.mixed_precision)
        self.world_size = self.acc.num_processes
        self.rank = self.acc.process_index
        self.device = self.acc.device
        self._cpu_group = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return self.acc.prepare(model, optimizer)

    def unwrap(self, model: Any) -> torch.nn.Module:
        # Accelerator.unwrap_model imports deepspeed (seconds) just to rule it out; DDP is all here
        return (
            model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        )

    def no_sync(self, model: Any) -> AbstractContextManager:
        return self.acc.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(tensor, reduction="sum") if self.world_size > 1 else tensor

    def all_min(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def flags(self, flag: int) -> list[int]:
        """Every rank's flag, gathered on the CPU (over gloo), so no GPU work is waited for."""
        if self.world_size == 1:
            return [flag]
        if self._cpu_group is None:
            self._cpu_group = torch.distributed.new_group(backend="gloo")
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, torch.tensor([flag]), group=self._cpu_group)
        return [int(t) for t in out]

    def reduce_gradients(self, model: Any) -> None:
        """Average the gradients over ranks (for steps whose backward ran without DDP's sync)."""
        if self.world_size > 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            _flat_in_place(grads, torch.distributed.all_reduce)
            for g in grads:
                g.div_(self.world_size)

    def sync_buffers(self, model: Any) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP's synced forward does."""
        if self.world_size > 1:
            _flat_in_place(list(model.buffers()), lambda t: torch.distributed.broadcast(t, src=0))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(tensor) if self.world_size > 1 else tensor

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]


def _flat_in_place(tensors: list[torch.Tensor], collective: Any) -> None:
    """Run `collective` once per dtype on a flat copy of `tensors`, then copy the result back."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(part.view_as(t))

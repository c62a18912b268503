"""Collectives over torch.distributed that both backends share (they run on the same groups)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class Collectives:
    """Sums, minima, flags, gathers and broadcasts among this job's ranks."""

    world_size: int
    device: torch.device
    _cpu_group: dist.ProcessGroup | None = None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    def all_min(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def flags(self, flag: int) -> list[int]:
        """Every rank's flag, gathered on the CPU (over gloo), so no GPU work is waited for."""
        if self.world_size == 1:
            return [flag]
        if self._cpu_group is None:
            group = dist.new_group(backend="gloo")
            assert isinstance(group, dist.ProcessGroup)  # all ranks: none is NON_GROUP_MEMBER
            self._cpu_group = group
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([flag]), group=self._cpu_group)
        return [int(t) for t in out]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP's synced forward does."""
        if self.world_size > 1:
            flat_in_place(list(model.buffers()), lambda t: dist.broadcast(t, src=0))


def flat_in_place(
    tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], object]
) -> None:
    """Run `collective` once per dtype on a flat copy of `tensors`, then copy the result back."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        parts = torch.split(flat, [t.numel() for t in group])  # Tensor.split is untyped
        for t, part in zip(group, parts, strict=True):
            t.copy_(part.view_as(t))

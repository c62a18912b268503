"""What the training loop needs from a backend (Accelerate now, DeepSpeed later)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch


class Backend(Protocol):
    world_size: int
    rank: int
    device: torch.device

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Wrap model and optimizer for distributed, mixed-precision training."""

    def unwrap(self, model: Any) -> torch.nn.Module:
        """The plain module inside whatever `prepare` wrapped it in."""

    def no_sync(self, model: Any) -> AbstractContextManager:
        """Skip the gradient all-reduce for a micro-step that is not the last of its step."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate (with loss scaling where the precision needs it)."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks."""

    def all_min(self, value: int) -> int:
        """The minimum of an integer over all ranks."""

    def flags(self, flag: int) -> list[int]:
        """Every rank's integer flag, in rank order (a host-side collective)."""

    def reduce_gradients(self, model: Any) -> None:
        """Average the gradients over ranks (for steps whose backward ran without a sync)."""

    def sync_buffers(self, model: Any) -> None:
        """Copy rank 0's buffers to every rank."""

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor from every rank, rank order."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""

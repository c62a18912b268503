"""What the training loop needs from a backend (Accelerate, DeepSpeed)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from launcher.types.plan import BatchPlan


class Backend(Protocol):
    world_size: int
    rank: int
    device: torch.device

    def prepare(self, model: torch.nn.Module, optimizer: Any, plan: BatchPlan) -> tuple[Any, Any]:
        """Wrap model and optimizer for distributed, mixed-precision training with `plan`."""

    def replan(self, model: Any, plan: BatchPlan) -> None:
        """Take a new micro-batch and accumulation (after an out-of-memory error)."""

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype floating inputs are cast to, for parameters of `dtype` (trainer.dtype)."""

    def unwrap(self, model: Any) -> torch.nn.Module:
        """The plain module inside whatever `prepare` wrapped it in."""

    def state_dict(self, model: Any) -> dict[str, torch.Tensor]:
        """The plain module's full-precision state; every rank calls it, inside `gathered`."""

    def optimizer_state(self, model: Any, optimizer: Any) -> dict[str, Any]:
        """The optimizer state in torch's format over the plain module's parameters, whole on
        every rank (so a checkpoint does not depend on the world size); every rank calls it."""

    def load_state(
        self, model: Any, optimizer: Any, weights: dict[str, Any], opt_state: dict[str, Any]
    ) -> None:
        """Put a checkpoint's float32 weights and optimizer state into the prepared objects."""

    # backends whose capabilities say sharded_checkpoints (FSDP2) also have
    # save_shards(model, optimizer, folder) -> manifest | None and load_shards(model, optimizer,
    # folder): launcher/backends/fsdp.py

    def gathered(self, model: Any) -> AbstractContextManager:
        """Inside it, every rank's module holds all parameters (ZeRO 3 gathers its shards)."""

    def begin_deferred_step(self, model: Any) -> None:
        """Before the micro-steps of a step whose gradients are reduced only after every rank
        got through them (OOM-safe steps): whatever must happen so those micro-steps run no
        collective (FSDP2 gathers the parameters now; nothing for DDP and ZeRO 0/1)."""

    def no_sync(self, model: Any) -> AbstractContextManager:
        """Skip the gradient all-reduce for a micro-step that is not the last of its step."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate (with loss scaling where the precision needs it)."""

    def gradient_scale(self) -> float:
        """The factor the gradients are multiplied by until the optimizer step (fp16 loss
        scaling), else 1."""

    def reduce_gradients(self, model: Any) -> None:
        """Average the gradients over ranks (for steps whose backward ran without a sync)."""

    def step(self, model: Any, optimizer: Any) -> None:
        """Clip (optim.clip_grad_norm), apply the optimizer step, zero the gradients."""

    def drop_gradients(self, model: Any, optimizer: Any) -> None:
        """Discard the partial gradients of a step that will not be taken."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks."""

    def all_min(self, value: int) -> int:
        """The minimum of an integer over all ranks."""

    def flags(self, flag: int) -> list[int]:
        """Every rank's integer flag, in rank order (a host-side collective)."""

    def sync_buffers(self, model: Any) -> None:
        """Copy rank 0's buffers to every rank."""

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor from every rank, rank order."""

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order, on every rank."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""

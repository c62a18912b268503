"""What the loop, the evaluation, the job's phases and the checkpoints ask of a training backend
(launcher/backends: Accelerate, DeepSpeed, FSDP2): one protocol, every method and attribute they
call. Each backend class is checked against it where the registry builds it
(launcher/backends/__init__.py).

The model a backend is handed back is the prepared one (`prepare`: DDP, a DeepSpeed engine, a
module FSDP2 sharded in place): a torch.nn.Module every time. The optimizer is `Any`: after
`prepare` it is a torch optimizer or DeepSpeed's wrapper of one, which is no torch Optimizer
and which DeepSpeed ships untyped.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from launcher.types.plan import BatchPlan

if TYPE_CHECKING:  # annotations only: launcher.backends, which planning reads, stays torch-free
    import torch


class Backend(Protocol):
    world_size: int
    rank: int
    device: torch.device

    # ----------------------------------------------------------------------------- set-up
    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: BatchPlan
    ) -> tuple[torch.nn.Module, Any]:
        """Wrap model and optimizer for distributed, mixed-precision training with `plan`."""

    def replan(self, model: torch.nn.Module, plan: BatchPlan) -> None:
        """Take a new micro-batch and accumulation (a ramp-up stage, an out-of-memory error)."""

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype floating inputs are cast to, for parameters of `dtype` (trainer.dtype)."""

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain module inside whatever `prepare` wrapped it in."""

    # ----------------------------------------------------------------------------- a step
    def begin_deferred_step(self, model: torch.nn.Module) -> None:
        """Before the micro-steps of a step whose gradients are reduced only after every rank
        got through them (OOM-safe steps): whatever must happen so those micro-steps run no
        collective (FSDP2 gathers the parameters now; nothing for DDP and ZeRO 0/1)."""

    def no_sync(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        """Skip the gradient all-reduce for a micro-step that is not the last of its step."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate (with loss scaling where the precision needs it)."""

    def gradient_scale(self) -> float:
        """The factor the gradients are multiplied by until the optimizer step (fp16 loss
        scaling), else 1."""

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Average the gradients over ranks (for steps whose backward ran without a sync)."""

    def step(
        self, model: torch.nn.Module, optimizer: Any, norms: torch.Tensor | None = None
    ) -> None:
        """Clip (optim.clip_grad_norm), apply the optimizer step, zero the gradients. `norms`:
        the per-tensor 2-norms of exactly these gradients where the loop has them (the health
        check's, when nothing reduced the gradients since), which the clip may use instead of
        computing them again."""

    def drop_gradients(self, model: torch.nn.Module, optimizer: Any) -> None:
        """Discard the partial gradients of a step that will not be taken."""

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Copy rank 0's buffers to every rank."""

    # ----------------------------------------------------------------------------- collectives
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks."""

    def all_min(self, value: int) -> int:
        """The minimum of an integer over all ranks."""

    def flags(self, flag: int) -> list[int]:
        """Every rank's integer flag, in rank order (a host-side collective)."""

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor from every rank, rank order."""

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order, on every rank."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""

    # ----------------------------------------------------------------------------- state
    def gathered(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        """Inside it, every rank's module holds all parameters (ZeRO 3 gathers its shards)."""

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The plain module's full-precision state; every rank calls it, inside `gathered`."""

    def optimizer_state(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        """The optimizer state in torch's format over the plain module's parameters, whole on
        every rank (so a checkpoint does not depend on the world size); every rank calls it.
        A backend whose checkpoints are sharded raises NotImplementedError."""

    def load_state(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        weights: dict[str, Any],
        opt_state: dict[str, Any],
    ) -> None:
        """Put a checkpoint's float32 weights and optimizer state into the prepared objects."""

    def save_shards(
        self, model: torch.nn.Module, optimizer: Any, folder: Path
    ) -> dict[str, list[Any]] | None:
        """Sharded checkpoints (capabilities: sharded_checkpoints): every rank writes its shards
        into `folder`; rank 0 gets the manifest ({file: [bytes, SHA-256]}), the others None.
        Any other backend raises NotImplementedError."""

    def load_shards(
        self, model: torch.nn.Module, optimizer: Any, folder: Path, files: list[str]
    ) -> None:
        """A sharded checkpoint's `files` in `folder` into this rank's shards (re-split for
        this world size). A backend without sharded checkpoints raises NotImplementedError."""

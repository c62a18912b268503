"""Activation checkpointing: a block keeps only its input; backward recomputes the rest.

PyTorch's own wrapper does the work (non-reentrant `torch.utils.checkpoint`; state-dict keys stay
those of the plain model). One thing it does not do: the recomputation is a second forward in
training mode, so BatchNorm would update its running statistics twice per step. The recompute
context below puts them back as the first forward left them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import nn


class Block(nn.Sequential):
    """A unit that activation checkpointing recomputes as a whole."""


@contextmanager
def _keep_buffers(block: nn.Module) -> Iterator[None]:
    with torch.no_grad():
        saved = [(b, b.clone()) for b in block.buffers()]
    try:
        yield  # torch may end the recomputation early by raising through here
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _contexts(
    block: nn.Module,
) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    return nullcontext(), _keep_buffers(block)  # (first forward, recomputation)


def checkpoint_blocks(model: nn.Module, block_types: tuple[type, ...]) -> nn.Module:
    """Wrap every submodule of `block_types` in place; returns `model`."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    def wrap(block: nn.Module) -> nn.Module:
        return checkpoint_wrapper(
            block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, context_fn=partial(_contexts, block)
        )

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, block_types)
    )
    return model

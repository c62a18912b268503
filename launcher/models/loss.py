"""The training loss and the evaluation counts: the built-in cross-entropy, or your own.

The loss of an optimizer step is a mean over its whole global batch, whatever its split into
ranks and micro-batches (launcher/training/loop.py `accumulate`):
- per token, for the cross-entropy of sequences (targets batch x positions): the sum of the token
  losses over the global batch / the number of counted target tokens in it, targets equal to
  IGNORE_INDEX (-100, F.cross_entropy's ignore_index: padding, prompt tokens) left out of both
  (Transformers' `num_items_in_batch`). The loop counts the step's tokens before its first
  forward (one host-side gather) and each micro-step's loss is its token sum x world size / that
  count (the backend averages over ranks). With no ignored target every sequence counts its
  positions, and this is the mean over sequences of their per-position mean, as before;
- per sample, for class labels and your loss (one value per sample): the sum over samples / the
  per-device batch, so the ranks' average is the mean over the global batch.

`checked_sum` is the loss of the memory probe's and the pre-flight's step: it says in one line
when the model's outputs do not fit the targets (`LossMismatch`); the loop calls `sum`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from launcher.config.checks import TARGET_KEY
from launcher.config.components import CrossEntropyConfig, LossConfig
from launcher.config.targets import instantiate
from launcher.data import IGNORE_INDEX
from launcher.errors import ConfigError


class LossMismatch(ValueError):
    """The model's outputs do not fit the targets for this loss (the message says how)."""


def full(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (DeepSpeed's bf16/fp16 models, autocast) -> float32 for the loss."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


class CrossEntropy:
    """Per-sample cross-entropy on integer targets; label smoothing in training only."""

    name = "cross_entropy"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def per_token(self, y: torch.Tensor) -> bool:
        """Whether the loss of targets like `y` is a mean per token (sequences), not per sample."""
        return y.dim() > 1

    def counted(self, y: torch.Tensor) -> int:
        """The target tokens the loss counts (those not IGNORE_INDEX)."""
        return int((y != IGNORE_INDEX).sum())

    def token_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses over the counted targets (the loop divides by their number
        over the global batch)."""
        return F.cross_entropy(
            full(logits).reshape(-1, logits.shape[-1]),
            y.reshape(-1),
            reduction="sum",
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )

    def sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over the samples of their cross-entropy (a sequence's: its positions' mean); the
        memory probe's loss, where the value does not matter."""
        logits = full(logits)
        if y.dim() == 1:
            return F.cross_entropy(logits, y, reduction="sum", label_smoothing=self.label_smoothing)
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            y.reshape(-1),
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        return total / y[0].numel()

    def checked_sum(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, torch.Tensor):
            raise LossMismatch(f"outputs are a {type(outputs).__name__}, not a tensor of logits")
        if y.is_floating_point() or y.is_complex():
            raise LossMismatch(
                f"targets {_shape(y)} are {y.dtype}; cross-entropy needs integer class labels "
                f"(another loss: loss.{TARGET_KEY})"
            )
        if outputs.dim() != y.dim() + 1 or outputs.shape[:-1] != y.shape:
            raise LossMismatch(
                f"outputs {_shape(outputs)} do not fit targets {_shape(y)}: cross-entropy needs "
                "outputs of the targets' shape + (classes,)"
            )
        return self.sum(outputs, y)

    def eval_counts(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[correct, predictions, summed cross-entropy, its count] of a batch (float64): accuracy
        and loss per class label, or per token for sequences, over the counted targets (not
        IGNORE_INDEX); no label smoothing."""
        logits = full(logits).reshape(-1, logits.shape[-1])
        y = y.reshape(-1)
        kept = y != IGNORE_INDEX
        correct = ((logits.argmax(dim=-1) == y) & kept).sum().double()
        loss = F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE_INDEX).double()
        count = kept.sum().double()
        return torch.stack([correct, count, loss, count])


class UserLoss:
    """Your loss: a callable(outputs, targets) -> one loss per sample (shape (batch,)).
    Evaluation reports its mean over samples, and accuracy where the outputs are class scores
    of integer targets (outputs of the targets' shape + (classes,))."""

    def __init__(self, fn: Any, name: str) -> None:
        self.fn, self.name = fn, name

    def per_token(self, y: torch.Tensor) -> bool:
        """Never: your loss gives one value per sample, averaged over the global batch."""
        return False

    def sum(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        return full(self.fn(outputs, y)).sum()

    def checked_sum(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        try:
            per_sample = self.fn(outputs, y)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise LossMismatch(
                f"loss {self.name} on outputs {_shape(outputs)} and targets {_shape(y)} raised "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            ) from exc
        n = len(y)
        if not isinstance(per_sample, torch.Tensor) or tuple(per_sample.shape) != (n,):
            raise LossMismatch(
                f"loss {self.name} returned {_shape(per_sample)} for {n} samples; it must return "
                f"one loss per sample, shape ({n},) (e.g. reduction='none'), so the launcher can "
                "average exactly over the global batch"
            )
        return full(per_sample).sum()

    def eval_counts(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        loss = full(self.fn(outputs, y)).double().sum()
        n = torch.tensor(float(len(y)), device=y.device, dtype=torch.float64)
        if classifies(outputs, y):
            scores = full(outputs).reshape(-1, outputs.shape[-1])
            correct = (scores.argmax(dim=-1) == y.reshape(-1)).sum().double()
            predictions = torch.tensor(float(y.numel()), device=y.device, dtype=torch.float64)
        else:
            correct = predictions = torch.zeros((), device=y.device, dtype=torch.float64)
        return torch.stack([correct, predictions, loss, n])


def classifies(outputs: Any, y: torch.Tensor) -> bool:
    """Outputs that are class scores of integer targets (the targets' shape + (classes,))."""
    return (
        isinstance(outputs, torch.Tensor)
        and not y.is_floating_point()
        and outputs.dim() == y.dim() + 1
        and outputs.shape[:-1] == y.shape
    )


def make_loss(cfg: LossConfig, label_smoothing: float = 0.0) -> CrossEntropy | UserLoss:
    if isinstance(cfg, CrossEntropyConfig):
        return CrossEntropy(label_smoothing)
    fn = instantiate(cfg.target, cfg.kwargs, "loss")
    if not callable(fn):
        raise ConfigError(
            f"loss.{TARGET_KEY}={cfg.target!r}: returned a {type(fn).__name__}, not a callable "
            "(a function of your own needs _partial_: true)"
        )
    return UserLoss(fn, cfg.target)

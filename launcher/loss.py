"""The training loss and the evaluation counts, for class labels and for per-token targets.

Every sample weighs the same: a class label's cross-entropy, or for a sequence (targets batch x
positions) the mean over its positions. The loop divides the sum over samples by the per-device
batch, so the mean over the global batch stays exact for either kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (DeepSpeed's bf16/fp16 models, autocast) -> float32 for the loss."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def loss_sum(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over the samples of each sample's cross-entropy (a sequence's: mean over positions)."""
    logits = full(logits)
    if y.dim() == 1:
        return F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        y.reshape(-1),
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return total / y[0].numel()


def eval_counts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[correct predictions, summed cross-entropy, predictions] of a batch (float64): accuracy and
    loss per class label, or per token for sequences."""
    logits = full(logits).reshape(-1, logits.shape[-1])
    y = y.reshape(-1)
    correct = (logits.argmax(dim=-1) == y).sum()
    loss = F.cross_entropy(logits, y, reduction="sum")
    return torch.stack(
        [
            correct.double(),
            loss.double(),
            torch.tensor(float(len(y)), device=y.device, dtype=torch.float64),
        ]
    )

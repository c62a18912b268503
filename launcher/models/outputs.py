"""What a model's outputs hold for the loss, and whether its labels are shifted (Transformers).

A Transformers model returns a `ModelOutput` whose `logits` the launcher's loss takes; a causal
language model is given its labels unshifted (it predicts token t + 1 at position t), which the
loader shifts as Transformers' own loss does (launcher/data/batches.py `Collate`).
Transformers is imported lazily: the core install does not have it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def logits_of(outputs: Any) -> Any:
    """A tensor as it is; the `logits` of a ModelOutput or dict; anything else unchanged."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    found = outputs.get("logits") if isinstance(outputs, Mapping) else None
    found = getattr(outputs, "logits", found)
    return found if isinstance(found, torch.Tensor) else outputs


def shifts_labels(model: Any) -> bool:
    """Whether `model` is a Transformers causal language model (labels given unshifted)."""
    name = type(model).__name__
    is_hf = any(c.__module__.startswith("transformers.") for c in type(model).__mro__)
    return is_hf and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel"))

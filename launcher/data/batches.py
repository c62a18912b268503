"""The forms a batch may take, and the one form the loop sees: (inputs, targets).

A batch from a loader is either
- an `(inputs, targets)` pair (torch's default collate of `(input, target)` samples), or
- a dict with the targets under "labels" (Hugging Face's data collators and tokenizers: the
  other keys, input_ids, attention_mask, pixel_values..., are the model's keyword arguments).

`Collate` turns what your collate function (or torch's default) returns into the pair, in the
loader's worker processes; for a causal language model (launcher/models/outputs.py
`shifts_labels`) it shifts the labels as Transformers' own loss does, so target t is the token
after input t and the launcher's per-token loss is exactly the model's. Inputs that are a dict
are passed to the model as keyword arguments (`call`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from launcher.data.targets import IGNORE_INDEX

LABEL_KEYS = ("labels", "label")  # a dict batch's targets (Transformers' collators: "labels")


class BadBatch(ValueError):
    """A batch the launcher cannot split into inputs and targets (the message says why)."""


def split(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of a batch: a pair as it is, a dict's labels apart from the rest."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        keys = [k for k in LABEL_KEYS if k in batch]
        if not keys:
            raise BadBatch(
                f"a dict batch with keys {sorted(map(str, batch))} has no 'labels'; return the "
                "targets under 'labels' (e.g. DataCollatorForLanguageModeling(mlm=False))"
            )
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        return inputs, batch[keys[0]]
    what = f"a {type(batch).__name__}" + (
        f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
    )
    raise BadBatch(f"a batch is {what}; it must be (inputs, targets) or a dict with 'labels'")


class Collate:
    """A loader's collate_fn: your collate (or torch's default) then `split`, labels shifted for
    a causal language model; picklable for spawned workers."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None, shift: bool = False) -> None:
        self.collate = collate
        self.shift = shift

    def __call__(self, samples: list[Any]) -> tuple[Any, Any]:
        from torch.utils.data import default_collate

        batch = (self.collate or default_collate)(samples)
        return self.pair(batch)

    def pair(self, batch: Any) -> tuple[Any, Any]:
        """(inputs, targets); a dict's labels shifted for a causal language model (a pair's
        targets are aligned with the outputs already: packed sequences, the text data)."""
        x, y = split(batch)
        y = torch.as_tensor(y)
        if self.shift and isinstance(batch, Mapping):
            y = shift(y)
        return x, y


def shift(labels: torch.Tensor) -> torch.Tensor:
    """Target t = label t + 1, the last IGNORE_INDEX: Transformers' ForCausalLMLoss shift (pad one
    IGNORE_INDEX on the right, drop the first); the result has `labels`' shape."""
    padded = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)
    return padded[..., 1:].contiguous()


def to_device(batch: Any, device: Any, dtype: Any) -> tuple[Any, Any]:
    """A batch (inputs, targets) on `device`, floating-point inputs cast to `dtype` (every
    tensor of a dict of inputs)."""
    x, y = batch
    return _moved(x, device, dtype), torch.as_tensor(y).to(device, non_blocking=True)


def _moved(x: Any, device: Any, dtype: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _moved(v, device, dtype) for k, v in x.items()}
    x = torch.as_tensor(x).to(device, non_blocking=True)
    return x.to(dtype) if x.is_floating_point() else x


def call(model: Any, inputs: Any) -> Any:
    """The model's outputs on `inputs`: a dict of inputs as keyword arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def rows(inputs: Any, start: int, stop: int | None) -> Any:
    """Samples [start, stop) of a batch's inputs (every tensor of a dict alike)."""
    if isinstance(inputs, Mapping):
        return {k: rows(v, start, stop) for k, v in inputs.items()}
    return inputs[start:stop]

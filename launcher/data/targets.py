"""The target the loss and its count leave out, in a module of its own: the package's init names
it, and the batches (a causal language model's shifted labels), the packing and your data's checks
read it without importing the init, which imports them."""

from __future__ import annotations

IGNORE_INDEX = -100  # a target left out of the loss and of its count (F.cross_entropy's default)

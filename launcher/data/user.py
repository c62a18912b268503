"""Your own data: `data._target_` names a factory whose result is the training and evaluation data.

What the factory may return:
- a `(train, eval)` pair;
- a dict with "train" and one of "eval", "test", "val", "validation";
- an object with such attributes (e.g. a SimpleNamespace or your own class).
A `num_classes` key or attribute beside them gives the built-in models their output size, and a
`collate_fn` makes the batches (dicts with "labels" or (inputs, targets) pairs: data/batches.py).

Each split is a map-style dataset (`len()` and `[i]`: a torch Dataset, a TensorDataset, a list)
or a stream (an iterable dataset: data/stream.py). Without a collate_fn its items are
`(input, target)` pairs of one fixed shape that torch's default collate stacks (tensors, numpy
arrays, numbers); with one they may be anything it takes, of any length. With data.pack_length
they are tokenized documents, packed here (data/packing.py). The first training sample is the
data's spec (with a collate_fn: the longest sample the launcher found, data/lengths.py): the
memory probe and the plan_only estimate repeat it, so no shape is written by hand. The factory
runs once per
process, with torch's, numpy's and Python's RNGs seeded to 0 (every rank builds the same data,
whatever the run's seed) and restored afterwards.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from launcher.config.checks import TARGET_KEY
from launcher.config.components import UserDataConfig
from launcher.config.schema import to_dict
from launcher.config.targets import instantiate
from launcher.data import DataSpec, Splits
from launcher.data.batches import BadBatch, Collate
from launcher.data.lengths import longest
from launcher.data.packing import packed
from launcher.data.stream import _iterate, is_stream
from launcher.data.targets import IGNORE_INDEX
from launcher.errors import ConfigError

EVAL_NAMES = ("eval", "test", "val", "validation")
_BUILT: dict[str, Splits] = {}  # the last config's data: built once, read by plan, probe and loop


def _where(cfg: UserDataConfig) -> str:
    return f"data.{TARGET_KEY}={cfg.target!r}"


@contextmanager
def _seeded() -> Iterator[None]:
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _parts(result: Any, where: str) -> tuple[Any, Any, Any, Any]:
    """(train, eval, num_classes or None, collate_fn or None) of what the factory returned."""
    if isinstance(result, (tuple, list)):
        if len(result) != 2:
            raise ConfigError(
                f"{where}: returned a {type(result).__name__} of {len(result)} items; expected "
                "(train, eval)"
            )
        return result[0], result[1], None, None
    if isinstance(result, dict):
        found = {k: v for k, v in result.items() if isinstance(k, str)}
    else:
        found = {
            k: getattr(result, k)
            for k in ("train", *EVAL_NAMES, "num_classes", "collate_fn")
            if hasattr(result, k)
        }
    evals = [name for name in EVAL_NAMES if found.get(name) is not None]
    if found.get("train") is None or not evals:
        raise ConfigError(
            f"{where}: returned a {type(result).__name__}; expected (train, eval), or a dict or "
            f"object with train and one of {', '.join(EVAL_NAMES)}"
        )
    collate = found.get("collate_fn")
    if collate is not None and not callable(collate):
        raise ConfigError(f"{where}: its collate_fn is a {type(collate).__name__}, not a callable")
    return found["train"], found[evals[0]], found.get("num_classes"), collate


def _first_sample(dataset: Any, split: str, where: str) -> Any:
    """The split's first sample: [0] of a map-style dataset, the first a stream yields."""
    if is_stream(dataset):
        if iter(dataset) is dataset:
            raise ConfigError(
                f"{where}: its {split} data is an iterator ({type(dataset).__name__}), which can "
                "be read once; return an iterable whose iter() starts over (an IterableDataset)"
            )
        try:
            return next(iter(_iterate(dataset)))
        except StopIteration:
            raise ConfigError(f"{where}: its {split} stream yields nothing") from None
        except Exception as exc:
            raise ConfigError(
                f"{where}: reading its {split} stream raised {type(exc).__name__}: {exc}"
            ) from exc
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ConfigError(
            f"{where}: its {split} data ({type(dataset).__name__}) is neither a map-style dataset "
            "(len() and [i]) nor an iterable one"
        )
    if len(dataset) == 0:
        raise ConfigError(f"{where}: its {split} data is empty")
    try:
        return dataset[0]
    except Exception as exc:
        raise ConfigError(f"{where}: {split}[0] raised {type(exc).__name__}: {exc}") from exc


def _first(dataset: Any, split: str, where: str, collate: Any) -> tuple[Any, torch.Tensor]:
    """The split's first sample as a batch of one (inputs, targets): through your collate_fn,
    or as an (input, target) pair of tensors; ConfigError if it is not such data."""
    item = _first_sample(dataset, split, where)
    if collate is not None:
        try:
            x, y = Collate(collate).pair(collate([item]))
        except BadBatch as exc:
            raise ConfigError(f"{where}: its collate_fn on [{split}[0]] gives {exc}") from None
        except Exception as exc:
            raise ConfigError(
                f"{where}: its collate_fn on [{split}[0]] raised {type(exc).__name__}: {exc}"
            ) from exc
        return x, y[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ConfigError(
            f"{where}: {split}[0] is a {type(item).__name__}; items must be (input, target) pairs "
            "(or return a collate_fn beside train and eval that makes batches of them)"
        )
    pair = []
    for name, value in zip(("input", "target"), item, strict=True):
        try:
            pair.append(torch.as_tensor(value))
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                f"{where}: the {name} of {split}[0] is a {type(value).__name__}, which torch "
                "cannot stack; return tensors, numpy arrays or numbers (e.g. a ToTensor transform)"
            ) from None
    return pair[0], pair[1]


def _shape(x: Any) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) of one sample's inputs (a dict's input_ids, or its first tensor)."""
    if isinstance(x, dict):
        x = x.get("input_ids", next(iter(x.values())))
    t = torch.as_tensor(x)
    return tuple(t.shape), t.dtype


def _build(cfg: UserDataConfig) -> Splits:
    where = _where(cfg)
    with _seeded():
        result = instantiate(cfg.target, cfg.kwargs, "data")
    train, evaluation, classes, collate = _parts(result, where)
    if cfg.pack_length:
        train, evaluation = _packed(cfg, where, train, evaluation, collate)
    x, y = _first(train, "train", where, collate)
    ex, ey = _first(evaluation, "eval", where, collate)
    if collate is None and (ex.shape, ex.dtype, ey.shape, ey.dtype) != (
        x.shape,
        x.dtype,
        y.shape,
        y.dtype,
    ):
        raise ConfigError(
            f"{where}: train[0] has inputs {tuple(x.shape)} {x.dtype} and targets "
            f"{tuple(y.shape)} {y.dtype}, eval[0] inputs {tuple(ex.shape)} {ex.dtype} and "
            f"targets {tuple(ey.shape)} {ey.dtype}; both splits must match"
        )
    if classes is not None and not (isinstance(classes, int) and classes > 1):
        raise ConfigError(f"{where}: num_classes={classes!r} must be an integer >= 2")
    counted = [t[t != IGNORE_INDEX] for t in (y, ey) if not t.is_floating_point()]
    top = max((int(t.max()) for t in counted if t.numel()), default=None)
    if collate is None:
        spec = DataSpec(tuple(x.shape), classes, tokens=y.dim() > 0, example=(x, y), top_target=top)
    else:
        spec = _collated_spec(train, collate, x, y, classes, top)
    return Splits(train=train, eval=evaluation, spec=spec, collate=collate)


def _packed(cfg: UserDataConfig, where: str, train: Any, evaluation: Any, collate: Any) -> Any:
    """Both splits' documents packed into sequences of data.pack_length (data/packing.py)."""
    length = f"data.pack_length={cfg.pack_length}"
    if collate is not None:
        raise ConfigError(
            f"{where}: returned a collate_fn, and {length} packs your documents into sequences "
            "itself; drop one of them"
        )
    try:
        return packed(train, cfg.pack_length), packed(evaluation, cfg.pack_length)
    except ValueError as exc:
        raise ConfigError(f"{where}: {length}: {exc}") from None


def _collated_spec(
    train: Any, collate: Any, x: Any, y: torch.Tensor, classes: Any, top: int | None
) -> DataSpec:
    """The spec of data your collate_fn batches: probe batches are the longest sample the
    launcher found, `n` times, through the collate (the worst case for a padding collate)."""
    sample, length, how = longest(train)
    shape, _ = _shape(x)
    return DataSpec(
        shape[1:],
        classes,
        tokens=y.dim() > 0,
        top_target=top,
        collate=collate,
        sample=sample,
        worst=f"{how}: {length:,} tokens",
        longest=length,
    )


def build(cfg: UserDataConfig) -> Splits:
    key = json.dumps(to_dict(cfg), sort_keys=True, default=repr)
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = _build(cfg)
    return _BUILT[key]


def release() -> None:
    """Drop the built data (a process that only starts workers need not hold a copy)."""
    _BUILT.clear()


def spec(cfg: UserDataConfig) -> DataSpec:
    return build(cfg).spec


def epoch_samples(cfg: UserDataConfig) -> tuple[int, str]:
    """The training data's len(); 0 for a stream without one (its epoch is trainer.samples)."""
    samples, _ = build(cfg).epoch()
    if samples == 0:
        return 0, f" (the training data {cfg.target} returned is a stream without len())"
    return samples, f" (len() of the training data {cfg.target} returned)"

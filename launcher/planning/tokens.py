"""Quantities stated in tokens, as the samples everything else counts (issue 22). PURE.

For sequence data (data.seq_len tokens in every sample) six keys may state a quantity in tokens.
Each converts exactly, tokens / data.seq_len, into its twin in samples, which the rest of the
launcher reads:

    global_batch_tokens       -> global_batch             (replaces it)
    schedule.warmup_tokens    -> schedule.warmup_samples  (replaces the warmup in epochs)
    trainer.tokens            -> trainer.samples          (replaces trainer.epochs)
    ramp.tokens               -> ramp.samples
    ramp.start_batch_tokens   -> ramp.start_batch
    checkpoint.every_tokens   -> checkpoint.every_samples

global_batch always has a value (the recipes set it), so global_batch_tokens replaces it, unless
global_batch is stated on the command line too (then the two must agree: config/compose.py); the
other twins are unused unless set (null or 0), and a twin set to another value than its token
key gives is refused, naming both. A count that is not whole, or that the plan would refuse (a
global batch that does not split over the devices, a ramp start that does not double up to
global_batch), is refused with the nearest valid token values. Converting a converted config
changes nothing, but each process converts a job's config once (launcher/training/job.py
concrete), so its plans, config.yaml, checkpoints and every reader of it see the samples; the
planner refuses a config that states tokens not yet converted (require_in_samples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from launcher.config.checks import twins_disagree
from launcher.config.schema import RunConfig
from launcher.errors import ConfigError
from launcher.planning.ramp import starts

SCAN = 1 << 20  # counts looked at on each side of a refused value for the nearest valid ones

# (group, token key, its twin in samples) besides global_batch_tokens -> global_batch
TWINS = (
    ("schedule", "warmup_tokens", "warmup_samples"),
    ("trainer", "tokens", "samples"),
    ("ramp", "tokens", "samples"),
    ("ramp", "start_batch_tokens", "start_batch"),
    ("checkpoint", "every_tokens", "every_samples"),
)


def tokens_per_sample(data: Any) -> int:
    """data.seq_len for sequence data, data.pack_length for packed documents; 0 for data without
    a fixed number of tokens per sample."""
    return int(getattr(data, "seq_len", 0) or getattr(data, "pack_length", 0) or 0)


def length_key(data: Any) -> str:
    """The key that says how many tokens a sample holds, for messages."""
    return "data.pack_length" if getattr(data, "pack_length", 0) else "data.seq_len"


def to_samples(
    key: str,
    tokens: int,
    per_sample: int,
    valid: Callable[[int], bool] = lambda n: n > 0,
    rule: str = "",
    name: str = "data.seq_len",
) -> int:
    """`tokens` / `per_sample` sequences, exactly, where `valid` accepts the count; else a
    ConfigError naming the key and the value, with the nearest token values that convert to a
    valid count (`rule`: what else a valid count must be, in words)."""
    count, rest = divmod(tokens, per_sample)
    if not rest and valid(count):
        return count
    first_below = count - 1 if not rest else count
    below = range(first_below, max(first_below - SCAN, -1), -1)
    lower = next((n for n in below if valid(n)), None)
    upper = next((n for n in range(count + 1, count + 1 + SCAN) if valid(n)), None)
    near = " or ".join(str(n * per_sample) for n in (lower, upper) if n is not None) or "none"
    what = f"{tokens / per_sample:,.6g}, not a whole number" if rest else f"{count:,}"
    rule = f"; {rule}" if rule else ""
    raise ConfigError(
        f"{key}={tokens}: {what} sequences of {per_sample} tokens ({name}){rule}; nearest "
        f"valid: {near}"
    )


def _data_name(data: Any) -> str:
    target = getattr(data, "target", None)
    return f"data._target_={target!r}" if target else f"data={data.name}"


def _stated(key: str, value: int | None) -> bool:
    """Whether a token key is set: null is unused, and 0 too but for a warmup (of 0 tokens)."""
    return value is not None and (value != 0 or key == "warmup_tokens")


def stated_in_tokens(cfg: RunConfig) -> tuple[tuple[str, int, str], ...]:
    """(token key, its value, its twin) for each quantity `cfg` states in tokens."""
    out = []
    if cfg.global_batch_tokens is not None:
        out.append(("global_batch_tokens", cfg.global_batch_tokens, "global_batch"))
    for group, key, twin in TWINS:
        value = getattr(getattr(cfg, group), key)
        if _stated(key, value):
            out.append((f"{group}.{key}", value, f"{group}.{twin}"))
    return tuple(out)


def in_samples(cfg: RunConfig, batch_step: tuple[int, str] = (1, "")) -> RunConfig:
    """`cfg` with each quantity stated in tokens converted into its twin in samples (the module
    docstring). `batch_step` = (step, words): a global batch the plan accepts is a positive
    multiple of `step` (launcher/planning/split.py batch_step), for the nearest valid values."""
    stated = stated_in_tokens(cfg)
    if not stated:
        return cfg
    seq = tokens_per_sample(cfg.data)
    if not seq:
        key, value, twin = stated[0]
        raise ConfigError(
            f"{key}={value}: tokens need sequence data with a fixed length (data.seq_len, as "
            f"data=text has, or data.pack_length for your documents); "
            f"{_data_name(cfg.data)} has none: state it in samples ({twin})"
        )
    gb = cfg.global_batch
    if cfg.global_batch_tokens is not None:
        step, words = batch_step
        rule = f"the global batch must be {words}" if step > 1 else ""
        name = length_key(cfg.data)
        gb = to_samples(
            "global_batch_tokens", cfg.global_batch_tokens, seq, _multiple(step), rule, name
        )
    changed: dict[str, dict[str, int]] = {}
    for group, key, twin in TWINS:
        part = getattr(cfg, group)
        tokens = getattr(part, key)
        if not _stated(key, tokens):
            continue
        samples = to_samples(
            f"{group}.{key}", tokens, seq, *_valid(group, key, gb), name=length_key(cfg.data)
        )
        unused = {f.name: f.default for f in dataclasses.fields(part)}[twin]
        if getattr(part, twin) not in (unused, samples):
            raise twins_disagree(
                f"{group}.{key}",
                tokens,
                f"{group}.{twin}",
                getattr(part, twin),
                seq,
                length_key(cfg.data),
            )
        changed.setdefault(group, {})[twin] = samples
    parts = {g: dataclasses.replace(getattr(cfg, g), **v) for g, v in changed.items()}
    return dataclasses.replace(cfg, global_batch=gb, **parts)


def require_in_samples(cfg: RunConfig) -> None:
    """Raise if a quantity `cfg` states in tokens is not yet its twin in samples: the planner
    must never read a twin the tokens did not set (in_samples sets them, once per process)."""
    seq = tokens_per_sample(cfg.data)
    for key, tokens, twin in stated_in_tokens(cfg):
        group, _, name = twin.rpartition(".")
        value = getattr(getattr(cfg, group) if group else cfg, name)
        if not seq or value is None or value * seq != tokens:
            raise RuntimeError(
                f"{key}={tokens}: not converted into {twin} ({value}); plan the config a job "
                "trains with (launcher.training.job.concrete), not the one composed"
            )


def _multiple(step: int) -> Callable[[int], bool]:
    return lambda n: n > 0 and n % step == 0


def _valid(group: str, key: str, gb: int) -> tuple[Callable[[int], bool], str]:
    """(valid, rule) of the count a token key converts to."""
    if key == "warmup_tokens":
        return (lambda n: n >= 0), ""
    if key == "start_batch_tokens":
        rule = f"ramp.start_batch must be global_batch {gb:,} / a power of two (2, 4, ...)"
        return (lambda n: starts(n, gb)), rule
    return (lambda n: n > 0), ""

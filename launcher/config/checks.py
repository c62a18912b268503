"""The checks every config group shares: one-line errors (the key, the value, what is allowed),
seeds, and the `_target_` convention of users' own components. No torch."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any

from launcher.errors import ConfigError


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {allowed}")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        fail(key, value, allowed)


def twins_disagree(
    key: str, tokens: int, twin: str, value: object, seq: int, name: str = "data.seq_len"
) -> ConfigError:
    """A quantity stated both in tokens and in samples, the two disagreeing (planning/tokens.py)."""
    count = f"{tokens // seq:,}" if tokens % seq == 0 else f"{tokens / seq:,.6g}"
    return ConfigError(
        f"{key}={tokens} and {twin}={value}: both set, and {tokens:,} tokens are {count} "
        f"sequences of {seq} ({name}); set one of them"
    )


SEED_LIMIT = 2**32  # numpy's generators take seeds in [0, 2^32); torch's would take more


def check_seed(key: str, value: int) -> None:
    require(0 <= value < SEED_LIMIT, key, value, f"must be in [0, {SEED_LIMIT:,})")


# --------------------------------------------------------------------- users' own components
TARGET_KEY = "_target_"
TARGET_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
CLASS_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True, kw_only=True)
class Target:
    """A user's component, Hydra's instantiate convention: `_target_` names a callable
    (package.module.name) and the other keys are its keyword arguments, except the launcher's own
    options (the subclass's other fields). Hydra's `_partial_`, `_args_`, `_convert_` and
    `_recursive_` pass through to `hydra.utils.instantiate`."""

    target: str
    """`_target_`: the import path of the factory"""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """the factory's keyword arguments (nested `_target_` nodes are instantiated too)"""

    @property
    def name(self) -> str:
        return self.target


def own_options(cls: type) -> tuple[str, ...]:
    """The launcher's own keys in a user component's node (not passed to the factory)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("target", "kwargs"))

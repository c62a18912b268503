"""Every numeric key has a largest value a real run can use (launcher/config/ranges.py): a value
past it is refused in one line naming the key, before anything overflows, allocates or crashes;
one below the key's smallest value too."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from launcher.config.compose import compose_dict
from launcher.config.ranges import MAXIMA, maximum
from launcher.config.schema import RunConfig, to_run_config
from launcher.errors import ConfigError

# the overrides that select a group's dataclass, by class name (the default config has the rest)
SELECT = {
    "MLPConfig": ["model=mlp"],
    "GPTConfig": ["+recipe=gpt_small"],
    "TextConfig": ["+recipe=gpt_small"],
    "SyntheticConfig": ["data=synthetic"],
    "ImageFolderConfig": ["data=imagefolder"],
    "Cifar10Config": ["data=cifar10"],
    "DeepSpeedConfig": ["backend=deepspeed"],
}
USERS = {"UserModelConfig", "UserDataConfig", "UserLossConfig"}  # checked through their own test
TEXT = {"slurm.time"}  # minutes or HH:MM:SS, kept as sbatch's text: its form is checked


def numeric_keys() -> list[tuple[str, str, bool]]:
    """(key, the dataclass holding it, whether it is a list) of every numeric field."""
    found: dict[tuple[str, str], bool] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            options = typing.get_args(hint) if union else (hint,)
            for option in options:
                if dataclasses.is_dataclass(option):
                    walk(option, f"{prefix}{f.name}.")
            listed = typing.get_origin(hint) is tuple
            kinds = typing.get_args(hint) if listed else options
            if any(k in (int, float) for k in kinds):
                found[(f"{prefix}{f.name}", cls.__name__)] = listed

    walk(RunConfig, "")
    return [(key, cls, listed) for (key, cls), listed in sorted(found.items()) if key not in TEXT]


KEYS = numeric_keys()


def test_every_numeric_key_has_a_maximum() -> None:
    assert len(KEYS) > 80
    missing = sorted({key for key, _, _ in KEYS} - set(MAXIMA))
    assert missing == []
    assert sorted(set(MAXIMA) - {key for key, _, _ in KEYS}) == []  # none for a key that is gone


def _past(value: float) -> float:
    return value + 1 if isinstance(value, int) else value * 10


@pytest.mark.parametrize(("key", "cls", "listed"), KEYS, ids=[f"{k}:{c}" for k, c, _ in KEYS])
def test_a_value_past_the_maximum_is_one_line_naming_the_key(key, cls, listed) -> None:
    if cls in USERS:
        pytest.skip("a user component's own option: the same key as a built-in's, tested there")
    node = compose_dict(SELECT.get(cls, []))
    if key.startswith("ramp.start_batch"):  # a ramp's start needs its length
        node["ramp"]["tokens" if key.endswith("tokens") else "samples"] = 4096
    *groups, name = key.split(".")
    part = node
    for group in groups:
        part = part[group]
    too_big = _past(maximum(key)[0])
    for value in (too_big, -1):  # the key's own check, or a check across keys naming it
        part[name] = [value] * len(part[name] or [1]) if listed else value
        with pytest.raises(ConfigError) as refused:
            to_run_config(node)
        assert key in str(refused.value) and "\n" not in str(refused.value)


def test_a_run_longer_than_a_count_can_say_exactly_is_refused_by_the_plan() -> None:
    from launcher.planning.plan import PlanInput, plan_batch

    cfg = to_run_config(compose_dict(["data=synthetic", "trainer.epochs=1e9"]))
    with pytest.raises(ConfigError) as refused:
        plan_batch(PlanInput(cfg, 1, 100_000_000))
    assert str(refused.value) == (
        "trainer.epochs=1e+09: 100,000,000,000,000,000 samples (100,000,000 per epoch), more than "
        "a run can count exactly (2^53); train fewer epochs"
    )

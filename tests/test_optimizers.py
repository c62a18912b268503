"""The optimizer table (launcher/config/optimizers.py): one list of optimizer names that the
factories, the config schema, the shipped configs and DeepSpeed's fused optimizers are held to,
and the family as data that every reader reads (a new family states its LR rule)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from launcher.backends.ds_config import FUSED, LAYERWISE
from launcher.config.optimization import LargeBatchConfig, OptimConfig
from launcher.config.optimizers import (
    FAMILIES,
    OPTIMIZER_FACTS,
    OPTIMIZER_NAMES,
    Family,
    Optimizer,
    family_of,
)
from launcher.optim import OPTIMIZERS
from launcher.planning.rules import scale_lr

CONF = Path(__file__).resolve().parents[1] / "conf" / "optim"


# ------------------------------------------------------------------------------ one list of names
def test_the_factories_build_the_optimizers_of_the_table() -> None:
    assert sorted(OPTIMIZERS) == sorted(OPTIMIZER_NAMES)


def test_the_schema_allows_the_optimizers_of_the_table() -> None:
    hint = typing.get_type_hints(OptimConfig)["name"]
    assert typing.get_args(hint) == OPTIMIZER_NAMES


def test_the_swap_targets_are_optimizers_of_the_table() -> None:
    swaps = {o.swap for o in OPTIMIZER_FACTS.values() if o.swap is not None}
    assert swaps <= set(OPTIMIZER_NAMES)
    hint = typing.get_type_hints(LargeBatchConfig)["optimizer"]
    assert set(typing.get_args(hint)) == {"auto"} | swaps
    decayed = {n for n, o in OPTIMIZER_FACTS.items() if o.swap_poly_power is not None}
    assert decayed == swaps  # a swapped-to optimizer says its decay


def test_every_optimizer_has_its_config_group() -> None:
    shipped = {path.stem: yaml.safe_load(path.read_text())["name"] for path in CONF.glob("*.yaml")}
    assert sorted(shipped) == sorted(OPTIMIZER_NAMES)
    assert all(stem == name for stem, name in shipped.items())


def test_the_deepspeed_names_are_of_the_table_and_of_deepspeed() -> None:
    assert set(FUSED) <= set(OPTIMIZER_NAMES) and set(LAYERWISE) <= set(OPTIMIZER_NAMES)
    config = pytest.importorskip("deepspeed.runtime.config")
    assert {name.lower() for name in FUSED.values()} <= set(config.DEEPSPEED_OPTIMIZERS)


# ------------------------------------------------------------------------------ the family as data
def test_a_family_states_its_lr_rule() -> None:
    with pytest.raises(TypeError, match="lr_rule"):
        Family(moments=1, momentum_buffer=False, reads=())  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="lr_rule='cubic'"):
        Family(lr_rule="cubic", moments=1, momentum_buffer=False, reads=())  # type: ignore[arg-type]


def test_an_optimizer_names_a_family_of_the_table() -> None:
    with pytest.raises(ValueError, match="family='shampoo'"):
        Optimizer("shampoo")


def test_the_families_read_config_keys() -> None:
    keys = {f.name for f in dataclasses.fields(OptimConfig)}
    for family in FAMILIES.values():
        assert set(family.reads) <= keys


@pytest.mark.parametrize("rule, lr", [("linear", 0.4), ("sqrt", 0.2)])
def test_a_third_family_gets_its_own_lr_rule(
    monkeypatch: pytest.MonkeyPatch, rule: typing.Any, lr: float
) -> None:
    """optim.scaling=auto reads the family's rule: none is assumed for a family the planner does
    not know."""
    monkeypatch.setitem(
        FAMILIES, "shampoo", Family(lr_rule=rule, moments=2, momentum_buffer=False, reads=())
    )
    monkeypatch.setitem(OPTIMIZER_FACTS, "shampoo", Optimizer("shampoo"))
    optim = OptimConfig(name="shampoo", base_lr=0.1, ref_batch=32)  # type: ignore[arg-type]
    got, got_rule, why = scale_lr(optim, 128)
    assert got == pytest.approx(lr) and got_rule == rule
    assert f"auto picks {rule} for shampoo" in why


@pytest.mark.parametrize(
    "name, momentum, states",
    [("sgd", 0.0, 0), ("sgd", 0.9, 1), ("lars", 0.9, 1), ("adam", 0.9, 2), ("lamb", 0.0, 2)],
)
def test_the_optimizer_state_the_memory_check_counts(
    name: str, momentum: float, states: int
) -> None:
    assert family_of(name).state_tensors(momentum) == states

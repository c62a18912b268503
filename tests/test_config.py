"""Tests for composition (conf/ + recipes/ + CLI) and validation into RunConfig."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import yaml

from launcher.config.compose import compose_run, split_sweep
from launcher.config.defaults import RUN_NODE, nodes
from launcher.config.execution import CheckpointConfig, TrainerConfig
from launcher.config.keys import replace_in
from launcher.config.resources import conf_dir, recipes_dir
from launcher.config.schema import RunConfig, to_dict, to_run_config
from launcher.errors import ConfigError
from tests.helpers import ROOT

GROUP_FILES = sorted(conf_dir().glob("*/*.yaml"))
RECIPE_FILES = sorted(recipes_dir().glob("*.yaml"))


@functools.cache
def _cfg(*overrides: str) -> RunConfig:
    return compose_run(list(overrides))


def _recipe_values(name: str) -> dict:
    return yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text())


def _mismatches(want: dict, got: dict, prefix: str = "") -> list[str]:
    """Keys of `want` (recursively) whose value in `got` differs."""
    out = []
    for key, value in want.items():
        if isinstance(value, dict):
            out += _mismatches(value, got[key], f"{prefix}{key}.")
        elif got[key] != value:
            out.append(f"{prefix}{key}: {got[key]!r} != {value!r}")
    return out


def test_there_is_something_to_compose():
    groups = {p.parent.name for p in GROUP_FILES}
    assert {"model", "data", "optim", "schedule", "backend", "trainer", "cluster"} <= groups
    assert {"mnist1d", "resnet50"} <= {p.stem for p in RECIPE_FILES}


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}={p.stem}")
def test_every_group_option_composes(path):
    group = path.parent.name
    cfg = _cfg(f"{group}={path.stem}")  # on the default recipe (mnist1d)
    assert isinstance(cfg, RunConfig) and cfg.recipe == "mnist1d"
    got = to_dict(cfg)[group]
    set_by_recipe = _recipe_values("mnist1d").get(group, {})
    option = yaml.safe_load(path.read_text())
    for key, value in option.items():
        if key != "defaults" and key not in set_by_recipe:
            assert got[key] == value, f"{group}.{key}"
    base = nodes().get(_base_of(option))  # the schema's defaults the option extends
    for key, value in (base or {}).items():
        if key not in option and key not in set_by_recipe:
            assert got[key] == value, f"{group}.{key} (schema default)"


def _base_of(option: dict) -> str | None:
    """The schema node a group option extends (`/schema/...@_here_` in its defaults list)."""
    for entry in option.get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/schema/"):
            return entry[1:].removesuffix("@_here_")
    return None


def _restated(option: dict, base: dict, prefix: str = "") -> list[str]:
    """Keys of a YAML option (recursively) whose value is the schema default."""
    out = []
    for key, value in option.items():
        if key == "defaults" or key not in base:
            continue
        if isinstance(value, dict) and isinstance(base[key], dict):
            out += _restated(value, base[key], f"{prefix}{key}.")
        elif value == base[key]:
            out.append(f"{prefix}{key}: {value!r}")
    return out


@pytest.mark.parametrize("path", [*GROUP_FILES, conf_dir() / "config.yaml"], ids=lambda p: p.name)
def test_the_yaml_holds_only_what_an_option_changes(path):
    """Defaults are written once, in the schema: a YAML value equal to it would be a second copy
    that silently wins when the schema's default changes."""
    option = yaml.safe_load(path.read_text())
    tree = nodes()
    if path.name == "config.yaml":
        base = tree[RUN_NODE]
        assert f"{RUN_NODE}" in option["defaults"], "config.yaml must start from the schema"
    else:
        name, group = _base_of(option), f"schema/{path.parent.name}"
        expected = group if group in tree else f"{group}/{option.get('name')}"
        if tree.get(expected):  # a group option extends its schema node
            assert name == expected, f"{path}: extends {name}, not {expected}"
        base = tree.get(expected, {})
    assert _restated(option, base) == [], f"{path}: restates schema defaults"


def test_a_changed_schema_default_reaches_the_composed_config(monkeypatch):
    """The schema is the source: change a default there and a run gets it, with no YAML edit."""
    trainer = {f.name: f for f in dataclasses.fields(TrainerConfig)}["nonfinite_limit"]
    checkpoint = {f.name: f for f in dataclasses.fields(CheckpointConfig)}["keep"]
    monkeypatch.setattr(trainer, "default", 7)
    monkeypatch.setattr(checkpoint, "default", 5)
    cfg = compose_run([])
    assert (cfg.trainer.nonfinite_limit, cfg.checkpoint.keep) == (7, 5)
    assert compose_run(["trainer.nonfinite_limit=2"]).trainer.nonfinite_limit == 2  # no `+`


def test_every_key_section_of_the_readme_is_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert replace_in(readme) == readme, "run: python -m launcher.config.keys --write README.md"
    for key in ("trainer.nonfinite_limit", "optim.large_batch.threshold", "slurm.mem", "seed"):
        assert f"| `{key}` |" in readme


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_composes(path):
    cfg = _cfg(f"+recipe={path.stem}")
    raw = _recipe_values(path.stem)
    assert cfg.recipe == path.stem
    values = {k: v for k, v in raw.items() if k != "defaults"}
    assert "global_batch" in values and "optim" in values
    assert _mismatches(values, to_dict(cfg)) == []


def test_default_recipe_is_mnist1d():
    assert _cfg() == _cfg("+recipe=mnist1d")


def test_resnet50_recipe():
    cfg = _cfg("+recipe=resnet50")
    assert (cfg.model.name, cfg.model.arch, cfg.model.zero_init_residual) == (
        "resnet",
        "resnet50",
        True,
    )
    assert cfg.optim.name == "sgd" and cfg.optim.nesterov is True
    assert (cfg.optim.base_lr, cfg.optim.ref_batch) == (0.1, 256)
    assert cfg.optim.large_batch.threshold == 8192
    assert cfg.schedule.decay == "step" and cfg.schedule.milestones == (30.0, 60.0, 80.0)
    assert cfg.trainer.epochs == 90 and cfg.data.name == "imagefolder"


@pytest.mark.parametrize("recipe_last", [False, True])
def test_cli_overrides_beat_recipe(recipe_last):
    overrides = [
        "optim.base_lr=0.2",
        "trainer.epochs=10",
        "schedule=cosine",
        "model=mlp",
        "optim.large_batch.threshold=100",
        "global_batch=1024",
    ]
    cfg = _cfg(
        *(overrides + ["+recipe=resnet50"] if recipe_last else ["+recipe=resnet50"] + overrides)
    )
    assert (cfg.optim.base_lr, cfg.trainer.epochs, cfg.global_batch) == (0.2, 10, 1024)
    assert cfg.schedule.decay == "cosine" and cfg.model.name == "mlp"
    assert cfg.optim.large_batch.threshold == 100
    assert cfg.optim.nesterov is True and cfg.optim.large_batch.warmup_epochs == 12  # recipe kept


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["+recipe=nope"], ["recipe", "nope", "mnist1d", "resnet50"]),
        (["model=nope"], ["model", "nope", "cnn1d", "mlp", "resnet50"]),
        (["optim=rmsprop"], ["optim", "rmsprop", "adamw", "lars"]),
        (["foo=1"], ["foo=1"]),
        (["+foo=1"], ["foo=1", "unknown key"]),
        (["+optim.foo=1"], ["optim.foo=1", "unknown key"]),
        (["global_batch=abc"], ["global_batch", "abc", "integer"]),
        (["global_batch=-5"], ["global_batch=-5", "> 0"]),
        (["global_batch=0"], ["global_batch=0", "> 0"]),
        (["global_batch=true"], ["global_batch=True", "integer"]),
        (["micro_batch=x"], ["micro_batch", "x", "auto"]),
        (["micro_batch=0"], ["micro_batch=0", "auto"]),
        (["optim.name=rmsprop"], ["optim.name", "rmsprop", "sgd", "lamb"]),
        (["optim.base_lr=0"], ["optim.base_lr=0", "> 0"]),
        (
            ["+recipe=resnet50", "schedule.milestones=[60,30]"],
            ["schedule.milestones=[60.0, 30.0]", "increasing"],
        ),
        (["recipe=resnet50"], ["recipe=resnet50", "+recipe=NAME"]),
    ],
)
def test_bad_input_raises_one_line_config_error(overrides, needles):
    with pytest.raises(ConfigError) as err:
        compose_run(overrides)
    msg = str(err.value)
    assert "\n" not in msg
    assert [n for n in needles if n not in msg] == [], msg


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("trainer.epochs='3'", "trainer.epochs", 3.0),  # float
        ("optim.base_lr='1e-3'", "optim.base_lr", 0.001),
        ("global_batch='128'", "global_batch", 128),  # int
        ("trainer.devices='2'", "trainer.devices", 2),  # int | Literal["auto"]
        ("trainer.devices='auto'", "trainer.devices", "auto"),
        ("memory.budget_gb='8'", "memory.budget_gb", 8.0),  # float | Literal["auto"]
        ("trainer.channels_last='false'", "trainer.channels_last", False),  # bool | "auto"
        ("trainer.channels_last='auto'", "trainer.channels_last", "auto"),
        ("data.pin_memory='0'", "data.pin_memory", False),
        ("plan_only='yes'", "plan_only", True),  # bool: OmegaConf's yes/no, on/off, 1/0
        ("schedule.milestones=['30','60']", "schedule.milestones", (30.0, 60.0)),
        ("slurm.time='90'", "slurm.time", "90"),  # str | int: a string stays a string
    ],
)
def test_a_string_for_a_number_or_bool_converts_as_omegaconfs_typed_nodes(override, key, value):
    """What `${oc.env:EPOCHS,3}` gives is a string; OmegaConf's IntegerNode, FloatNode and
    BooleanNode convert it for a typed field, and so does the schema."""
    cfg = compose_run(["+recipe=resnet50", "data=synthetic", override])
    got = functools.reduce(getattr, key.split("."), cfg)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs='three'", "trainer.epochs='three': must be a number"),
        ("optim.base_lr='inf'", "optim.base_lr=inf: must be a finite number"),
        ("optim.base_lr='nan'", "optim.base_lr=nan: must be a finite number"),
        ("global_batch='1.5'", "global_batch='1.5': must be an integer"),
        ("trainer.devices='two'", "trainer.devices='two': must be an integer or one of auto"),
        ("trainer.channels_last='maybe'", "must be true or false or one of auto"),
    ],
)
def test_a_string_that_does_not_convert_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        compose_run(["+recipe=resnet50", "data=synthetic", override])
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_an_environment_variable_gives_a_number(tmp_path, monkeypatch):
    """`${oc.env:EPOCHS,3}` through the command line's entry point, with EPOCHS set."""
    from launcher.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPOCHS", "2")
    args = ["trainer.epochs=${oc.env:EPOCHS,3}", "plan_only=true", "memory.probe=false"]
    assert main([*args, "run_dir=run"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["trainer"]["epochs"] == 2
    monkeypatch.delenv("EPOCHS")
    assert compose_run(args[:1]).trainer.epochs == 3  # the default, also a string


def test_missing_required_key():
    node = to_dict(_cfg())
    del node["optim"]["base_lr"]  # a key without a schema default
    with pytest.raises(ConfigError, match="optim.base_lr is required"):
        to_run_config(node)


def test_split_sweep():
    jobs = split_sweep(["global_batch=32,512", "seed=1,2", "+recipe=mnist1d"])
    assert len(jobs) == 4
    assert {(c.global_batch, c.seed) for c in map(compose_run, jobs)} == {
        (32, 1),
        (32, 2),
        (512, 1),
        (512, 2),
    }
    assert split_sweep(["global_batch=32"]) == [["global_batch=32"]]


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("+recipe=resnet50",),
        ("+recipe=resnet50", "data=synthetic", "cluster=a100x8", "optim=adamw"),
        ("model=mlp", "micro_batch=16", "run_dir=/tmp/x", "schedule=poly"),
    ],
)
def test_to_dict_round_trips_through_yaml(overrides):
    cfg = _cfg(*overrides)
    node = to_dict(cfg)
    assert node["recipe"] == cfg.recipe
    back = to_run_config(yaml.safe_load(yaml.safe_dump(node)))
    assert back == cfg

"""Hydra composition: conf/ + recipes/ + command-line overrides -> RunConfig.

Hydra runs here, in the launching process, and nowhere else. Recipes live in the top-level
`recipes/` folder and are registered as the `recipe` group (package `_global_`), so
`+recipe=NAME` selects one. Hydra's own errors become one-line `ConfigError`s.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, RunConfig, to_run_config

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"
DEFAULT_RECIPE = "mnist1d"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _register_recipe(name: str) -> None:
    """Store the selected recipe only (parsing YAML is start-up time). An unknown name is refused
    here: with no recipe stored Hydra would take `+recipe=NAME` for a plain new key."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    names = recipe_names()
    if name not in names:
        raise ConfigError(f"recipe={name!r}: unknown; choose from {', '.join(names)}")
    node = OmegaConf.load(RECIPES_DIR / f"{name}.yaml")
    ConfigStore.instance().store(group="recipe", name=name, node=node, package="_global_")


def _recipe_of(overrides: list[str]) -> tuple[str, list[str]]:
    """The recipe an override list selects; adds the default recipe when none is given."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "recipe":
            if not key.startswith("+"):
                raise ConfigError(f"{item!r}: select a recipe with +recipe=NAME")
            return value, overrides
    return DEFAULT_RECIPE, [f"+recipe={DEFAULT_RECIPE}", *overrides]


def _hydra_error(exc: Exception) -> ConfigError:
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        options = recipe_names() if group == "recipe" else group_options(group)
        if group:
            return ConfigError(f"{group}={name!r}: unknown; choose from {', '.join(options)}")
    lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if ln.strip()]
    return ConfigError("; ".join(lines[:3]))


def compose_dict(overrides: list[str]) -> dict[str, Any]:
    """Compose the config for one job and return it as a resolved plain dict."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    recipe, overrides = _recipe_of(overrides)
    _register_recipe(recipe)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        node = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _hydra_error(exc) from None
    node["recipe"] = recipe
    return node


def compose_run(overrides: list[str]) -> RunConfig:
    """Compose and validate one job's config."""
    return to_run_config(compose_dict(overrides))


def split_sweep(overrides: list[str]) -> list[list[str]]:
    """Expand multirun overrides (`a=1,2 b=x,y`) into one override list per job (Hydra's rules)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        axes = [
            [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if o.is_sweep_override()
            else [o.input_line]
            for o in parsed
        ]
    except HydraException as exc:
        raise _hydra_error(exc) from None
    return [list(job) for job in itertools.product(*axes)]

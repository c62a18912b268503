"""Hydra composition: packaged conf/ and recipes/, a user's --config-dir, overrides -> RunConfig.

Hydra runs here, in the process that parses the command line. The search path is Hydra's own for
an app whose config is the package `launcher.conf`, with `--config-dir` added where Hydra's
`--config-dir` flag adds it: after the launcher's config, before structured configs. Built-in
recipes are registered as structured configs of the `recipe` group when selected; a user's
`recipe/NAME.yaml` is an ordinary group option. `+recipe=NAME` is composed as
`+recipe@_global_=NAME`, so a recipe sets top-level keys whether or not its file says
`# @package _global_`. A selected option that exists both built in and in the user's folder is
refused: the search path would silently take the launcher's. Hydra's own errors become one-line
`ConfigError`s, and so do a config file's YAML errors (file, line, column), a defaults list that
includes itself (the cycle of files) and a file that is not UTF-8 text: Hydra lets them escape
as tracebacks, a circular defaults list as a RecursionError thousands of lines long.
"""

from __future__ import annotations

import itertools
import os
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

from launcher.config.checks import own_options, twins_disagree
from launcher.config.components import UserDataConfig, UserModelConfig
from launcher.config.defaults import register
from launcher.config.hydra_internals import defaults_cycle, file_being_read, initialized
from launcher.config.resources import conf_dir, conf_search_path, recipes_dir
from launcher.config.schema import RunConfig, to_run_config
from launcher.errors import ConfigError

DEFAULT_RECIPE = "mnist1d"
HYDRA_PLUGINS = {  # Hydra launcher and sweeper options the launcher supports: how to install them
    "hydra/launcher=joblib": "pip install 'globalbatch[joblib]'",
    "hydra/launcher=submitit_slurm": "pip install 'globalbatch[slurm]'",
    "hydra/launcher=submitit_local": "pip install 'globalbatch[slurm]'",
    "hydra/sweeper=optuna": "pip install 'globalbatch[search]'",
}
GROUPS = ("model", "data", "loss", "optim", "schedule", "backend", "trainer", "cluster")


def user_config_dir(path: str) -> Path:
    """The absolute path of a `--config-dir`, which must be a folder."""
    folder = Path(path).expanduser().absolute()
    if not folder.is_dir():
        raise ConfigError(f"--config-dir={path!r}: not a folder")
    if (folder / "config.yaml").exists():
        raise ConfigError(
            f"--config-dir={path!r}: holds config.yaml, which the launcher's own primary config "
            "would shadow; put your settings in a recipe (recipe/NAME.yaml, +recipe=NAME)"
        )
    return folder


def _names(folder: Path | None) -> set[str]:
    return {p.stem for p in folder.glob("*.yaml") if p.is_file()} if folder is not None else set()


def _user(config_dir: Path | None, group: str) -> Path | None:
    return config_dir / group if config_dir is not None else None


def recipe_names(config_dir: Path | None = None) -> list[str]:
    """Built-in recipes and those in `config_dir`/recipe/."""
    return sorted(_names(recipes_dir()) | _names(_user(config_dir, "recipe")))


def group_options(group: str, config_dir: Path | None = None) -> list[str]:
    """A config group's options: built in and in `config_dir`/GROUP/."""
    return sorted(_names(conf_dir() / group) | _names(_user(config_dir, group)))


def _clash(group: str, name: str, config_dir: Path | None) -> ConfigError:
    return ConfigError(
        f"{group}={name!r}: both the launcher and {Path(config_dir or '.') / group / name}.yaml "
        "define it, and "
        "Hydra's search path takes the launcher's (its config comes before --config-dir); give "
        "yours another name"
    )


def register_recipe(name: str, config_dir: Path | None) -> None:
    """Store the selected built-in recipe (parsing every recipe is start-up time). An unknown name
    is refused here: with no recipe found Hydra would take `+recipe=NAME` for a plain new key."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    builtin = name in _names(recipes_dir())
    if name in _names(_user(config_dir, "recipe")):
        if builtin:
            raise _clash("recipe", name, config_dir)
        return
    if not builtin:
        options = ", ".join(recipe_names(config_dir))
        raise ConfigError(f"recipe={name!r}: unknown; choose from {options}")
    node = OmegaConf.load(recipes_dir() / f"{name}.yaml")
    ConfigStore.instance().store(group="recipe", name=name, node=node, package="_global_")


def _recipe_of(overrides: list[str]) -> tuple[str, list[str]]:
    """The recipe an override list selects (the default one when none is given), and the overrides
    with the selection made global."""
    for i, item in enumerate(overrides):
        key, _, value = item.partition("=")
        if key.lstrip("+~").split("@")[0] == "recipe":
            if not key.startswith("+"):
                raise ConfigError(f"{item!r}: select a recipe with +recipe=NAME")
            return value, [*overrides[:i], f"+recipe@_global_={value}", *overrides[i + 1 :]]
    return DEFAULT_RECIPE, [f"+recipe@_global_={DEFAULT_RECIPE}", *overrides]


def _launcher_options(overrides: list[str]) -> list[str]:
    """`model.activation_checkpointing=true` and the other launcher options of a group set with
    `++` (add or replace): a user's group option need not list them to be overridden."""
    own = {f"model.{k}" for k in own_options(UserModelConfig)}
    own |= {f"data.{k}" for k in own_options(UserDataConfig)}
    return [f"++{o}" if o.partition("=")[0] in own else o for o in overrides]


# what composing a config folder can raise besides Hydra's and OmegaConf's own errors: YAML that
# does not parse (PyYAML's error, raised through Hydra as it is), a defaults list that includes
# itself (Hydra recurses until Python stops it), a file that is not text or not readable
FILE_ERRORS = (RecursionError, UnicodeDecodeError, OSError)


def _compose_errors() -> tuple[type[BaseException], ...]:
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (HydraException, OmegaConfBaseException, yaml.YAMLError, *FILE_ERRORS)


def _yaml_error(exc: Any) -> ConfigError:
    """PyYAML's error as one line: the file, the line and column, what is wrong."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return ConfigError(f"not valid YAML: {' '.join(str(exc).split())}")
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}"
    context, at = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and at is not None:
        problem += f" ({context} at line {at.line + 1}, column {at.column + 1})"
    return ConfigError(f"{where}: not valid YAML: {problem}")


def _cycle_error(exc: RecursionError, config_dir: Path | None) -> ConfigError:
    """A defaults list that includes itself, named from Hydra's recursion (the configs it was
    expanding), or another endless recursion said as such."""
    cycle = defaults_cycle(exc)
    if cycle is None:
        return ConfigError("composing the config recursed without end (circular defaults?)")
    where = f"--config-dir={str(config_dir)!r}: " if config_dir else ""
    return ConfigError(
        f"{where}circular defaults: {' -> '.join(f'{c}.yaml' for c in cycle)} (a "
        "defaults list includes a config that includes it again)"
    )


def _file_of(exc: BaseException) -> str:
    """The config file Hydra was reading when `exc` was raised."""
    return file_being_read(exc) or "a config file"


def _hydra_error(exc: BaseException, config_dir: Path | None = None) -> ConfigError:
    import yaml
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    if isinstance(exc, yaml.YAMLError):
        return _yaml_error(exc)
    if isinstance(exc, RecursionError):
        return _cycle_error(exc, config_dir)
    if isinstance(exc, UnicodeDecodeError):
        return ConfigError(f"{_file_of(exc)}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    if isinstance(exc, OSError) and not isinstance(exc, HydraException):
        return ConfigError(f"{_file_of(exc)}: cannot be read ({exc.strerror or exc})")
    if isinstance(exc, OverrideParseException):
        first = str(exc).splitlines()[0].rstrip(".")
        return ConfigError(
            f"{exc.override!r}: not an override Hydra can read ({first}); a value holding = or "
            "other special characters goes in quotes: 'key=\"a=b\"'"
        )

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        if group.startswith("hydra/"):
            install = HYDRA_PLUGINS.get(f"{group}={name}", "see python -m launcher --info")
            return ConfigError(f"{group}={name!r}: not available here ({install})")
        if group:
            options = ", ".join(group_options(group, config_dir))
            return ConfigError(f"{group}={name!r}: unknown; choose from {options}")
    lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if ln.strip()]
    return ConfigError("; ".join(lines[:3]))


def _hydra(config_dir: Path | None) -> AbstractContextManager[None]:
    """Hydra initialised as for an app with the launcher's config (config/resources.py) and
    `--config-dir`."""
    return initialized("launcher", conf_search_path(), config_dir)


def compose_dict(overrides: list[str], config_dir: Path | None = None) -> dict[str, Any]:
    """Compose the config for one job and return it as a resolved plain dict."""
    from hydra import compose
    from omegaconf import OmegaConf, open_dict

    recipe, overrides = prepare_overrides(overrides, config_dir)
    try:
        with _hydra(config_dir):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        node = cast(
            dict[str, Any], OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        )
    except _compose_errors() as exc:
        raise _hydra_error(exc, config_dir) from None
    check_clashes(choices, config_dir)
    _check_stated_batch(overrides, node)
    node["recipe"] = recipe
    return node


def _check_stated_batch(overrides: list[str], node: dict[str, Any]) -> None:
    """global_batch_tokens replaces the recipe's global_batch (planning/tokens.py), but not one
    the command line states: the two must then be the same batch."""
    data = node.get("data") or {}
    tokens, seq = node.get("global_batch_tokens"), data.get("seq_len") or data.get("pack_length")
    stated = any(o.partition("=")[0].lstrip("+") == "global_batch" for o in overrides)
    if not stated or not isinstance(tokens, int) or not isinstance(seq, int) or seq <= 0:
        return  # the schema and the conversion say what is wrong with these
    if tokens % seq or tokens // seq != node.get("global_batch"):
        name = "data.seq_len" if data.get("seq_len") else "data.pack_length"
        raise twins_disagree(
            "global_batch_tokens", tokens, "global_batch", node["global_batch"], seq, name
        )


def check_composes(overrides: list[str], config_dir: Path | None = None) -> None:
    """Hydra composes these overrides (values are not resolved: --cfg shows them as written), or
    one-line ConfigError."""
    from hydra import compose

    overrides = prepare_overrides(overrides, config_dir)[1]
    try:
        with _hydra(config_dir):
            compose("config", overrides=overrides, return_hydra_config=True)
    except _compose_errors() as exc:
        raise _hydra_error(exc, config_dir) from None


def prepare_overrides(overrides: list[str], config_dir: Path | None) -> tuple[str, list[str]]:
    """(recipe, the overrides as Hydra composes them): the recipe selected as a global package
    and registered when built in, the launcher's own group options set with `++`."""
    recipe, overrides = _recipe_of(_launcher_options(overrides))
    register()  # the schema's defaults, which the packaged YAML extends
    register_recipe(recipe, config_dir)
    return recipe, overrides


def check_clashes(choices: dict[str, Any], config_dir: Path | None) -> None:
    """Refuse a selected group option that exists both built in and in the user's folder."""
    for group in GROUPS:
        option = choices.get(group)
        if option and option in _names(conf_dir() / group) & _names(_user(config_dir, group)):
            raise _clash(group, option, config_dir)


def compose_run(overrides: list[str], config_dir: Path | None = None) -> RunConfig:
    """Compose and validate one job's config."""
    return to_run_config(compose_dict(overrides, config_dir))


def _sweep_values(override: Any) -> list[str]:
    """An override's values as jobs: each of a choice or range, the two ends of an interval (a
    search samples between them: checking both ends checks the values it can draw)."""
    from hydra.core.override_parser.types import IntervalSweep

    if not override.is_sweep_override():
        return [override.input_line]
    key, value = override.get_key_element(), override.value()
    if isinstance(value, IntervalSweep):
        return [f"{key}={value.start}", f"{key}={value.end}"]
    return [f"{key}={v}" for v in override.sweep_string_iterator()]


def split_sweep(overrides: list[str]) -> list[list[str]]:
    """Expand multirun overrides (`a=1,2 b=x,y`) into one override list per job (Hydra's rules;
    an interval, which only a search sweeper takes, as its two ends)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        axes = [_sweep_values(o) for o in parsed]
    except HydraException as exc:
        raise _hydra_error(exc) from None
    return [list(job) for job in itertools.product(*axes)]


def split_config_dir(args: list[str]) -> tuple[Path | None, list[str]]:
    """Take Hydra's `--config-dir DIR` / `--config-dir=DIR` / `-cd DIR` out of an argument list;
    returns (the absolute folder or None, the other arguments)."""
    found: str | None = None
    rest: list[str] = []
    items = iter(args)
    for arg in items:
        name, eq, value = arg.partition("=")
        if name in ("--config-dir", "-cd"):
            if not eq:
                value = next(items, "")
            if not value:
                raise ConfigError(f"{name}: needs a folder (--config-dir DIR)")
            if found is not None:
                raise ConfigError(f"{name}={value!r}: --config-dir given twice")
            found = value
        else:
            rest.append(arg)
    return (user_config_dir(found) if found is not None else None), rest


PLAIN = re.compile(r"[\w/.\-+:@~]+")  # a value Hydra's grammar reads as written, unquoted


def hydra_quote(text: str) -> str:
    """`text` (a path, say) as a Hydra override value that reads back as exactly `text`: as is
    when plain, else quoted, with `${` escaped (no interpolation) and a trailing `\\` doubled."""
    if PLAIN.fullmatch(text):
        return text
    body = text.replace("${", "\\${")
    quote = "'" if "'" not in text else '"'
    if quote in text:
        body = body.replace(quote, f"\\{quote}")
    if body.endswith("\\"):  # a trailing backslash would escape the closing quote
        body += "\\"
    return f"{quote}{body}{quote}"


def override_value(override: str) -> str:
    """The value of one `key=value` override as Hydra reads it (quotes and escapes undone)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    raw = override.partition("=")[2]
    if PLAIN.fullmatch(raw) or not raw:
        return raw
    try:
        value = OverridesParser.create().parse_override(override).value()
    except HydraException as exc:
        raise _hydra_error(exc) from None
    return raw if not isinstance(value, str) else value.replace("\\${", "${")  # as resolved


def config_dir_args(config_dir: Path | None) -> list[str]:
    """The arguments that pass `config_dir` on to another process (workers, sbatch scripts)."""
    return [f"--config-dir={os.fspath(config_dir)}"] if config_dir is not None else []

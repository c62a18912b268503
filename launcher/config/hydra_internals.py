"""Every use the launcher makes of Hydra's private API, in one place (and of argparse's, where
Hydra's parser needs it): what `@hydra.main` does inside, which the launcher does itself so that
its checks run first (launcher/hydra_app.py), and what it reads of Hydra's internals to say a
config error in one line (launcher/config/compose.py).

Each wrapper was read from Hydra 1.3.8 (HYDRA_VERSION; pyproject.toml pins hydra-core to it) and
says where; tests/test_hydra_internals.py pins the installed version and each behaviour relied
on, so an upgrade of Hydra shows here first. Hydra is imported inside the wrappers: importing
this module costs nothing (`python -m launcher --help` never loads Hydra).

A launch composes its config once (`composing_once`): the launcher composes it to check it, and
Hydra's run, which would compose it twice more (its mode, then the job's config), is handed that
composition with the settings the launcher adds after the check (SETTLED_AFTER) applied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, cast

if TYPE_CHECKING:
    import argparse

    from hydra.core.config_search_path import ConfigSearchPath

HYDRA_VERSION = "1.3.8"  # the hydra-core these wrappers were read from
VERSION_BASE = "1.3"  # Hydra's defaults of that version (what `version_base="1.3"` selects)
CONFIG_DIR_PROVIDER = "command-line"  # the search path entry `--config-dir` makes
# Hydra's bash completion script (hydra/_internal/core_plugins/bash_completion.py), where it
# tells a `python FILE.py` line from a command's (launcher/flags.py completes python -m launcher)
BASH_PYTHON_BRANCH = '    if [ "${words[0]}" == "python" ]; then\n'
# Hydra settings added after the launcher's check of a run (launcher/hydra_app.py: where the run
# goes, Hydra's _run_app: its mode): each only sets its value in the hydra node, so a composition
# of the checked overrides followed by them is the checked composition with their values set
SETTLED_AFTER = ("hydra.run.dir", "hydra.sweep.dir", "hydra.mode")
# compositions made inside composing_once(): (search path, config name, overrides) -> config
_remembered: dict[tuple[Any, ...], Any] | None = None


def command_line_parser(
    error: Callable[[str], NoReturn], version: Callable[[], str]
) -> argparse.ArgumentParser:
    """Hydra's own command-line parser (Hydra 1.3.8: hydra._internal.utils.get_args_parser: -m,
    --config-dir, --cfg, --info, -sc, --version, ...; the overrides as `overrides`), changed
    where argparse offers no public way on a parser made elsewhere: its errors go to `error`
    (argparse's own prints the usage and exits 2), --version prints `version()` (Hydra's prints
    "Hydra 1.3.8" alone) with its lines as they are."""
    import argparse

    from hydra._internal.utils import get_args_parser

    class Version(argparse._VersionAction):  # argparse's (private), its text made when asked
        def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: Any,
            option_string: str | None = None,
        ) -> None:
            self.version = version()
            super().__call__(parser, namespace, values, option_string)

    parser = get_args_parser()
    parser.error = error  # type: ignore[method-assign,assignment]  # no hook for it
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # --version's lines as given
    for action in parser._actions:
        if isinstance(action, argparse._VersionAction):  # Hydra's: "Hydra 1.3.8" alone
            action.__class__ = Version
    return parser


def run_hydra(
    args: argparse.Namespace, task: Callable[[Any], Any], config_path: str, config_name: str
) -> None:
    """What `@hydra.main(version_base="1.3")` runs once it has parsed the command line (Hydra
    1.3.8: hydra.version.setbase, then hydra._internal.utils._run_hydra): the run, the sweep,
    --cfg, --info, -sc or --hydra-help that `args` (command_line_parser's) asks for. Hydra
    handles an Exception of the task itself (a traceback and exit 1); a BaseException that is no
    Exception reaches the caller as raised. The task is pickled to the processes of a launcher
    plugin (joblib, submitit); Hydra names the job after the module that defines it. A run or a
    sweep goes through _run_or_sweep (its compositions can come from composing_once's)."""
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    version.setbase(VERSION_BASE)
    shows = args.help or args.hydra_help or args.cfg is not None or args.shell_completion
    other = shows or args.info is not None or args.resolve or (args.run and args.multirun)
    if not other and _run_or_sweep(args, task, config_path, config_name):
        return
    _run_hydra(
        args=args,
        args_parser=get_args_parser(),  # Hydra's own, unchanged: --hydra-help shows it
        task_function=task,
        config_path=config_path,
        config_name=config_name,
    )


def _run_or_sweep(
    args: argparse.Namespace, task: Callable[[Any], Any], config_path: str, config_name: str
) -> bool:
    """_run_hydra's run or sweep (Hydra 1.3.8 hydra/_internal/utils.py _run_hydra, after its
    checks of the other commands: the task's name and search path from the task's module, the
    --config-dir entry, the main Hydra, its mode, then _run_app), through a Hydra whose config
    loader takes its compositions from composing_once's. False where the task's module is not
    known (_run_hydra then looks up the caller's stack)."""
    from hydra._internal.utils import (
        _run_app,
        create_automatic_config_search_path,
        detect_calling_file_or_module_from_task_function,
        detect_task_name,
        run_and_report,
    )
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import validate_config_path

    calling_file, calling_module = detect_calling_file_or_module_from_task_function(task)
    if calling_file is None and calling_module is None:
        return False
    config_name = args.config_name if args.config_name is not None else config_name
    config_path = args.config_path if args.config_path is not None else config_path
    validate_config_path(config_path)
    task_name = detect_task_name(calling_file, calling_module)
    search_path = create_automatic_config_search_path(calling_file, calling_module, config_path)
    if args.config_dir is not None:
        run_and_report(lambda: _add_config_dir(search_path, args.config_dir, check=True))
    hydra = run_and_report(lambda: _main_hydra(task_name, search_path))
    try:
        args.run = not args.multirun  # (_run_hydra: no command given is a run)
        mode = hydra.get_mode(config_name=config_name, overrides=args.overrides)
        _run_app(
            run=args.run,
            multirun=args.multirun,
            mode=mode,
            hydra=hydra,
            config_name=config_name,
            task_function=task,
            overrides=args.overrides,
        )
    finally:
        GlobalHydra.instance().clear()
    return True


def _add_config_dir(search_path: ConfigSearchPath, config_dir: str, check: bool = False) -> None:
    """--config-dir on the search path: after the app's config, before the structured configs
    (Hydra 1.3.8: _run_hydra's add_conf_dir, which refuses a folder that is not there)."""
    import os

    from hydra.core.config_search_path import SearchPathQuery
    from hydra.errors import SearchPathException

    folder = os.path.abspath(config_dir)
    if check and not os.path.isdir(folder):
        raise SearchPathException(f"Additional config directory '{folder}' not found")
    search_path.prepend(
        provider=CONFIG_DIR_PROVIDER,
        path=f"file://{folder}",
        anchor=SearchPathQuery(provider="schema"),
    )


def _main_hydra(task_name: str, search_path: ConfigSearchPath) -> Any:
    """Hydra.create_main_hydra2 (Hydra 1.3.8 hydra/_internal/hydra.py) with the remembering
    config loader: the main Hydra, made the global one."""
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra

    hydra = Hydra(task_name=task_name, config_loader=_loader_class()(search_path))
    GlobalHydra.instance().initialize(hydra)
    return hydra


@contextmanager
def initialized(task_name: str, config_path: str, config_dir: Path | None) -> Iterator[None]:
    """Hydra initialised as `@hydra.main` initialises it for an app whose config is `config_path`,
    run with `--config-dir config_dir`, so `hydra.compose` composes what a run would (Hydra
    1.3.8: hydra._internal.utils.create_config_search_path, the --config-dir entry where
    _run_hydra prepends it, hydra._internal.hydra.Hydra.create_main_hydra2); cleared after."""
    from hydra import version
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    version.setbase(VERSION_BASE)
    search_path = create_config_search_path(config_path)
    if config_dir is not None:
        _add_config_dir(search_path, str(config_dir))
    GlobalHydra.instance().clear()
    _main_hydra(task_name, search_path)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


@contextmanager
def composing_once() -> Iterator[None]:
    """Within: each run composition (Hydra's RUN mode) is remembered, and a later one of the same
    config, search path and overrides, followed by none or more SETTLED_AFTER settings, is that
    composition (a copy) with those settings applied as Hydra applies an override, instead of
    being composed again. Hydra's run asks for its mode in a MULTIRUN composition without the
    sweep check (Hydra.get_mode): where the run composition succeeded it is the same config, and
    it is answered the same way. A sweep's compositions are Hydra's own. Composing reads the
    config files, the working directory and the environment: none of them changes within."""
    global _remembered
    outer = _remembered
    _remembered = {}
    try:
        yield
    finally:
        _remembered = outer


@cache
def _loader_class() -> type[Any]:
    """Hydra's config loader (Hydra 1.3.8 hydra/_internal/config_loader_impl.py ConfigLoaderImpl,
    load_configuration) remembering its run compositions inside composing_once()."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.types import RunMode

    class Remembering(ConfigLoaderImpl):
        def load_configuration(
            self,
            config_name: str | None,
            overrides: list[str],
            run_mode: RunMode,
            from_shell: bool = True,
            validate_sweep_overrides: bool = True,
        ) -> Any:
            memo = _remembered
            a_run = run_mode == RunMode.RUN
            if memo is None or not (a_run or not validate_sweep_overrides):
                return super().load_configuration(
                    config_name, overrides, run_mode, from_shell, validate_sweep_overrides
                )
            where = tuple((p.provider, p.path) for p in self.config_search_path.get_path())
            found = _settled(memo, (where, config_name), list(overrides))
            if found is not None:
                return found
            cfg = super().load_configuration(
                config_name, overrides, run_mode, from_shell, validate_sweep_overrides
            )
            if a_run:  # (a MULTIRUN one skips missing group options: not remembered)
                memo[(where, config_name, tuple(overrides))] = copy.deepcopy(cfg)
            return cfg

    return Remembering


def _settled(
    memo: dict[tuple[Any, ...], Any], config: tuple[Any, ...], overrides: list[str]
) -> Any:
    """The remembered composition of `config` whose overrides begin `overrides`, the rest being
    SETTLED_AFTER settings, as a copy with those applied as Hydra applies a config override
    (Hydra 1.3.8 ConfigLoaderImpl._load_configuration_impl: _apply_overrides_to_config, then the
    input line appended to hydra.overrides.hydra); None if there is none."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    bases = [k for k in memo if k[:2] == config and tuple(overrides[: len(k[2])]) == k[2]]
    if not bases:
        return None
    base = max(bases, key=lambda k: len(k[2]))
    try:
        rest = OverridesParser.create().parse_overrides(overrides[len(base[2]) :])
    except HydraException:
        return None  # Hydra's composition says what is wrong with it
    for o in rest:
        plain = o.type == OverrideType.CHANGE and o.package is None and not o.is_sweep_override()
        if not plain or o.key_or_group not in SETTLED_AFTER:
            return None
    cfg = copy.deepcopy(memo[base])
    try:
        ConfigLoaderImpl._apply_overrides_to_config(rest, cfg)
    except (HydraException, OmegaConfBaseException):
        return None  # (a value the setting does not take) Hydra's composition says it
    for o in rest:
        cfg.hydra.overrides.hydra.append(o.input_line)
    return cfg


def config_dir_of(config_sources: Iterable[Any]) -> Path | None:
    """The `--config-dir` a job was run with, from its hydra.runtime.config_sources (Hydra 1.3.8:
    _run_hydra adds it with provider "command-line", schema "file"), or None."""
    folders = [
        Path(source.path)
        for source in config_sources
        if source.provider == CONFIG_DIR_PROVIDER and source.schema == "file"
    ]
    return folders[0] if folders else None


def _frames(exc: BaseException) -> Iterator[tuple[str, dict[str, Any]]]:
    """(function name, local variables) of each frame `exc` was raised through, outermost first."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame.f_code.co_name, tb.tb_frame.f_locals
        tb = tb.tb_next


def defaults_cycle(exc: RecursionError) -> list[str] | None:
    """The configs of a defaults list that includes itself, from Hydra's recursion through them
    ("model/a", "model/b", "model/a"), or None when the recursion was no such cycle. Hydra 1.3.8
    expands each config in hydra._internal.defaults_list._create_defaults_tree_impl, its node in
    the local `root` (root.node.get_config_path(): "model/a")."""
    seen: list[str] = []
    for name, variables in _frames(exc):
        if name == "_create_defaults_tree_impl" and "root" in variables:
            path = str(variables["root"].node.get_config_path())
            if path in seen:
                return [*seen[seen.index(path) :], path]
            seen.append(path)
    return None


def file_being_read(exc: BaseException) -> str | None:
    """The config file Hydra was reading when `exc` was raised, or None. Hydra 1.3.8 reads a file
    in hydra._internal.core_plugins.file_config_source.FileConfigSource.load_config, its path in
    the local `full_path`."""
    found = None
    for name, variables in _frames(exc):
        if name == "load_config" and isinstance(variables.get("full_path"), str):
            found = variables["full_path"]
    return found


def completion_shells() -> list[str]:
    """The shells Hydra's completion plugins serve (Hydra 1.3.8: hydra.core.plugins.Plugins
    discovers the CompletionPlugin classes, each `provides()` its shell): bash, fish, zsh."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.completion_plugin import CompletionPlugin

    plugins = Plugins.instance().discover(CompletionPlugin)
    return sorted(cast(type[CompletionPlugin], plugin).provides() for plugin in plugins)

"""Every use the launcher makes of Hydra's private API, in one place (and of argparse's, where
Hydra's parser needs it): what `@hydra.main` does inside, which the launcher does itself so that
its checks run first (launcher/hydra_app.py), and what it reads of Hydra's internals to say a
config error in one line (launcher/config/compose.py).

Each wrapper was read from Hydra 1.3.8 (HYDRA_VERSION; pyproject.toml pins hydra-core to it) and
says where; tests/test_hydra_internals.py pins the installed version and each behaviour relied
on, so an upgrade of Hydra shows here first. Hydra is imported inside the wrappers: importing
this module costs nothing (`python -m launcher --help` never loads Hydra).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, cast

if TYPE_CHECKING:
    import argparse

HYDRA_VERSION = "1.3.8"  # the hydra-core these wrappers were read from
VERSION_BASE = "1.3"  # Hydra's defaults of that version (what `version_base="1.3"` selects)
CONFIG_DIR_PROVIDER = "command-line"  # the search path entry `--config-dir` makes
# Hydra's bash completion script (hydra/_internal/core_plugins/bash_completion.py), where it
# tells a `python FILE.py` line from a command's (launcher/flags.py completes python -m launcher)
BASH_PYTHON_BRANCH = '    if [ "${words[0]}" == "python" ]; then\n'


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
    plugin (joblib, submitit); Hydra names the job after the module that defines it."""
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    version.setbase(VERSION_BASE)
    _run_hydra(
        args=args,
        args_parser=get_args_parser(),  # Hydra's own, unchanged: --hydra-help shows it
        task_function=task,
        config_path=config_path,
        config_name=config_name,
    )


@contextmanager
def initialized(task_name: str, config_path: str, config_dir: Path | None) -> Iterator[None]:
    """Hydra initialised as `@hydra.main` initialises it for an app whose config is `config_path`,
    run with `--config-dir config_dir`, so `hydra.compose` composes what a run would (Hydra
    1.3.8: hydra._internal.utils.create_config_search_path, the --config-dir entry where
    _run_hydra prepends it, hydra._internal.hydra.Hydra.create_main_hydra2); cleared after."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    version.setbase(VERSION_BASE)
    search_path = create_config_search_path(config_path)
    if config_dir is not None:  # after the app's config, before the structured configs
        search_path.prepend(
            provider=CONFIG_DIR_PROVIDER,
            path=f"file://{config_dir}",
            anchor=SearchPathQuery(provider="schema"),
        )
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name, search_path)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


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

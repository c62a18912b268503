"""Two of Hydra's flags as the launcher gives them (launcher/hydra_app.py runs the rest):

- `--version`: the launcher's version (the `globalbatch` distribution's), then Hydra's line.
- `--shell-completion` / `-sc install|uninstall|query=SHELL`: Hydra's completion. Hydra names the
  program from sys.argv[0]: the installed `globalbatch` command works as Hydra writes it, but for
  `python -m launcher` Hydra's bash script completes only `python FILE.py`, and its query reads
  `-m launcher` as a sweep flag and an override. So the bash (and zsh) script also completes
  `python -m launcher ...`, and a query's line is read without its `python -m launcher`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import launcher
from launcher.config.compose import recipe_names, register_recipe
from launcher.config.defaults import register
from launcher.config.hydra_internals import BASH_PYTHON_BRANCH, completion_shells
from launcher.errors import ConfigError

DISTRIBUTION = "globalbatch"  # pyproject.toml: the name `launcher` is taken on the public index
SUBCOMMANDS = ("install", "uninstall", "query")
MODULE = re.compile(r"\s*\S*python[\d.]*\s+-m\s+launcher(?=\s|$)")  # how a query's line starts
# the branch for `python -m launcher`, before Hydra's for `python FILE.py` (BASH_PYTHON_BRANCH)
MODULE_BRANCH = (
    '    if [ "${words[0]}" == "python" ] && [ "${words[1]}" == "-m" ] '
    '&& [ "${words[2]}" == "launcher" ]; then\n'
    '        helper="${words[0]} -m launcher"\n'
    '    elif [ "${words[0]}" == "python" ]; then\n'
)


def version() -> str:
    """What `--version` prints: the launcher's version, then Hydra's own line. The version is the
    installed distribution's; a source tree that is not installed says its own (launcher/
    __init__.py, which tests keep equal to pyproject.toml) and where it is."""
    from importlib import metadata  # on demand: it is slow to import

    import hydra

    here = Path(launcher.__file__).parent
    try:
        installed: str | None = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        installed = None
    if installed is None:
        own = f"{launcher.__version__} (not installed: the source tree at {here.parent})"
    elif installed != launcher.__version__:
        own = f"{launcher.__version__} (the source tree at {here.parent}; {installed} installed)"
    else:
        own = installed
    return f"{DISTRIBUTION} {own}\nHydra {hydra.__version__}"


def check_completion(overrides: list[str]) -> str:
    """The one subcommand `-sc` needs (install=SHELL, uninstall=SHELL or query=SHELL); returns
    it. Anything else is one line: Hydra's own answer is a traceback."""
    available = completion_shells()
    allowed = f"give one of install, uninstall, query=SHELL (SHELL: {', '.join(available)})"
    example = 'e.g. eval "$(python -m launcher -sc install=bash)"'
    given = " ".join(overrides)
    command, _, shell = given.partition("=")
    if len(overrides) != 1 or command not in SUBCOMMANDS:
        raise ConfigError(f"--shell-completion {given}".rstrip() + f": {allowed}, {example}")
    if shell not in available:
        raise ConfigError(f"--shell-completion {given}: {allowed}")
    if command == "install" and shell == "fish" and run_as_module():
        raise ConfigError(
            f"--shell-completion {given}: Hydra's fish completion completes a command or python "
            "FILE.py, not python -m launcher; use the installed command: "
            "globalbatch -sc install=fish | source"
        )
    return command


def shell_completion(overrides: list[str], run: Callable[[], None]) -> None:
    """`-sc ...`: checked, then Hydra's completion (`run` runs Hydra with the flag), with the
    bash/zsh script also completing python -m launcher when that is how it was started."""
    command = check_completion(overrides)
    if command == "query":
        prepare_query()
    if command != "install" or not run_as_module():
        run()
        return
    with contextlib.redirect_stdout(io.StringIO()) as script:
        run()
    print(module_script(script.getvalue()), end="")


def run_as_module() -> bool:
    """Whether this process is `python -m launcher` (not the `globalbatch` command)."""
    started = Path(sys.argv[0])
    return started.name == "__main__.py" and started.parent.name == "launcher"


def query_line(line: str) -> str:
    """A completion query's command line as Hydra can read it: `python -m launcher ARGS` becomes
    `launcher ARGS` (Hydra drops the program's name, one word)."""
    found = MODULE.match(line)
    return f"launcher{line[found.end() :]}" if found else line


def module_script(script: str) -> str:
    """Hydra's bash completion script, also completing `python -m launcher ...` (Hydra's own
    completes `python FILE.py`, which `-m launcher` is not)."""
    if script.count(BASH_PYTHON_BRANCH) != 1:  # hydra-core is pinned; a test holds it
        raise RuntimeError("Hydra's bash completion script is not Hydra 1.3's")
    return script.replace(BASH_PYTHON_BRANCH, MODULE_BRANCH)


def prepare_query() -> None:
    """Before Hydra answers a query: its line without `python -m launcher`, and every built-in
    recipe known to Hydra (a run registers only the one it selects), so `+recipe=` completes."""
    if "COMP_LINE" not in os.environ:  # Hydra's query reads it: a KeyError traceback
        raise ConfigError(
            "--shell-completion query=SHELL: the installed completion runs it, with the line "
            "being completed in COMP_LINE; install it: "
            'eval "$(python -m launcher -sc install=bash)"'
        )
    os.environ["COMP_LINE"] = query_line(os.environ["COMP_LINE"])
    register()
    for name in recipe_names():
        register_recipe(name, None)

"""Where the shipped config, recipes and sbatch templates are: beside the code that runs.

`conf/`, `recipes/` and `slurm/` sit at the top of the repository and are mapped into the package
at build time (pyproject.toml: `launcher.conf`, `launcher.recipes`, `launcher.slurm_templates`),
so an installed launcher (a wheel, `pip install .`, an editable install) finds them inside the
package, from any working directory. When the `launcher` package is imported from a checkout
instead (`python -m launcher` inside it, whatever is installed: the checkout's launcher/ comes
first on sys.path), the checkout's own folders are used, so the code and its config always come
from the same tree.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from launcher.errors import LauncherError

CONF_PACKAGE = "launcher.conf"
FOLDERS = {
    CONF_PACKAGE: "conf",
    "launcher.recipes": "recipes",
    "launcher.slurm_templates": "slurm",
}
DISTRIBUTION = 'name = "globalbatch"'  # the checkout's pyproject.toml says it
PACKAGE_DIR = Path(__file__).parent.parent  # the `launcher` package's folder (this is config/)


class NotInstalled(LauncherError):
    """The launcher's config folders are not where its code is (a broken install)."""


@cache
def source_tree() -> Path | None:
    """The checkout the running `launcher` package was imported from, or None (installed)."""
    top = PACKAGE_DIR.resolve().parent
    try:
        ours = DISTRIBUTION in (top / "pyproject.toml").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    found = ours and all((top / name).is_dir() for name in FOLDERS.values())
    return top if found else None


def _folder(package: str) -> Path:
    tree = source_tree()
    if tree is not None:
        return tree / FOLDERS[package]
    try:
        path = Path(str(files(package)))
    except ModuleNotFoundError:
        raise NotInstalled(
            f"{package} is missing beside {PACKAGE_DIR}: the launcher's "
            "install is incomplete; reinstall it (pip install --force-reinstall globalbatch)"
        ) from None
    if not path.is_dir():  # a zipped install: the launcher needs its files on disk
        raise NotInstalled(
            f"{package} is not a folder on disk ({path}); install the wheel unzipped"
        )
    return path


def conf_dir() -> Path:
    """The launcher's Hydra config: config.yaml and the group folders."""
    return _folder(CONF_PACKAGE)


def conf_search_path() -> str:
    """The launcher's config as an entry of Hydra's search path: the installed package, or the
    checkout's conf/ folder (an absolute path) when the code runs from a checkout."""
    return f"pkg://{CONF_PACKAGE}" if source_tree() is None else str(conf_dir())


def recipes_dir() -> Path:
    """The built-in recipes, one YAML each."""
    return _folder("launcher.recipes")


def slurm_dir() -> Path:
    """The sbatch templates."""
    return _folder("launcher.slurm_templates")

"""Where the shipped config, recipes and sbatch templates are: inside the installed package.

`conf/`, `recipes/` and `slurm/` sit at the top of the repository and are mapped into the package
at build time (pyproject.toml: `launcher.conf`, `launcher.recipes`, `launcher.slurm_templates`),
so they are found the same way from a wheel, a non-editable or an editable install, from any
working directory. Nothing here looks at the source tree.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONF_PACKAGE = "launcher.conf"


def _folder(package: str) -> Path:
    try:
        path = Path(str(files(package)))
    except ModuleNotFoundError:  # e.g. the repository's launcher/ shadowing a wheel install
        import launcher

        raise RuntimeError(
            f"{package} is missing beside {Path(launcher.__file__).parent}: that is a source "
            "tree, not an installed launcher; install it (pip install . or pip install -e .) and "
            "run it from another folder"
        ) from None
    if not path.is_dir():  # a zipped install: the launcher needs its files on disk
        raise RuntimeError(
            f"{package} is not a folder on disk ({path}); install the wheel unzipped"
        )
    return path


def conf_dir() -> Path:
    """The launcher's Hydra config: config.yaml and the group folders."""
    return _folder(CONF_PACKAGE)


def recipes_dir() -> Path:
    """The built-in recipes, one YAML each."""
    return _folder("launcher.recipes")


def slurm_dir() -> Path:
    """The sbatch templates."""
    return _folder("launcher.slurm_templates")

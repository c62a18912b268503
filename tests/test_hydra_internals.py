"""Hydra's private API as the launcher uses it (launcher/config/hydra_internals.py), pinned: the
installed hydra-core is the one pyproject.toml pins and the wrappers were read from, and each
wrapper does what the launcher relies on. All in this process: an upgrade of Hydra fails here,
in seconds, before it fails a run."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any, NoReturn

import hydra
import pytest
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from launcher.config import hydra_internals as internals
from launcher.config.compose import prepare_overrides
from launcher.config.resources import conf_search_path
from tests.helpers import ROOT

QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none"]  # leave pytest's logging alone


class Refused(Exception):
    pass


def _refuse(message: str) -> NoReturn:
    raise Refused(message)


def _parser() -> Any:
    return internals.command_line_parser(_refuse, lambda: "globalbatch 9\nHydra x")


@pytest.fixture(autouse=True)
def _no_hydra_left() -> Any:
    yield
    GlobalHydra.instance().clear()


def test_the_installed_hydra_is_the_pinned_one() -> None:
    pinned = re.search(r'"hydra-core==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None, "pyproject.toml pins hydra-core to one version"
    assert hydra.__version__ == pinned.group(1) == internals.HYDRA_VERSION


def test_hydras_parser_reads_what_the_launcher_reads() -> None:
    args = _parser().parse_args([])
    assert vars(args) == {
        "help": False,
        "hydra_help": False,
        "overrides": [],
        "cfg": None,
        "resolve": False,
        "package": None,
        "run": False,
        "multirun": False,
        "shell_completion": False,
        "config_path": None,
        "config_name": None,
        "config_dir": None,
        "experimental_rerun": None,
        "info": None,
    }
    args, unknown = _parser().parse_known_intermixed_args(["a=1", "-m", "b=2", "-cd", "d", "-x"])
    assert (args.overrides, args.multirun, args.config_dir, unknown) == (
        ["a=1", "b=2"],
        True,
        "d",
        ["-x"],
    )
    assert _parser().parse_args(["--info"]).info == "all"
    with pytest.raises(Refused, match="invalid choice: 'nope'"):  # not argparse's usage and exit 2
        _parser().parse_args(["--cfg", "nope"])


def test_version_prints_the_launchers_lines_as_they_are(capsys: Any) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == "globalbatch 9\nHydra x\n"


def _config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "a.yaml").write_text("defaults:\n  - /model/b\n")
    (folder / "model" / "b.yaml").write_text("defaults:\n  - /model/a\n")
    (folder / "recipe").mkdir()
    (folder / "recipe" / "latin.yaml").write_bytes("seed: 'é'\n".encode("latin-1"))
    return folder


def test_a_run_runs_the_task_here_and_lets_a_base_exception_through(tmp_path: Path) -> None:
    """The task runs in this process with the job's config and Hydra's records in hydra.run.dir;
    a BaseException (hydra_app.Failed) reaches the caller as raised; an Exception is Hydra's (a
    traceback and exit 1: why the launcher wraps its errors in Failed)."""
    seen: list[tuple[Any, ...]] = []

    class Stop(BaseException):
        pass

    def task(cfg: Any) -> float:
        runtime = HydraConfig.get().runtime
        seen.append(
            (cfg.global_batch, runtime.output_dir, internals.config_dir_of(runtime.config_sources))
        )
        if cfg.seed == 1:
            raise Stop
        if cfg.seed == 2:
            raise ValueError("a task's own error")
        return 0.5

    config_dir = _config_dir(tmp_path)

    def run(*overrides: str) -> None:
        args = _parser().parse_args(["--config-dir", str(config_dir)])
        given = [*overrides, f"hydra.run.dir={tmp_path / 'run'}", *QUIET]
        args.overrides = prepare_overrides(given, config_dir)[1]
        internals.run_hydra(args, task, conf_search_path(), "config")

    run("global_batch=48")
    assert seen == [(48, str(tmp_path / "run"), config_dir)]
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").is_file()
    with pytest.raises(Stop):
        run("seed=1")
    with pytest.raises(SystemExit) as done, contextlib.redirect_stderr(io.StringIO()):
        run("seed=2")
    assert done.value.code == 1


def test_initialized_composes_what_a_run_would(tmp_path: Path) -> None:
    """--config-dir after the launcher's config and before the structured configs, where the
    run's own search path has it; Hydra is cleared after."""
    config_dir = _config_dir(tmp_path)
    with internals.initialized("launcher", conf_search_path(), config_dir):
        assert GlobalHydra.instance().is_initialized()
        cfg = compose(
            "config", overrides=prepare_overrides([], config_dir)[1], return_hydra_config=True
        )
    assert not GlobalHydra.instance().is_initialized()
    sources = cfg.hydra.runtime.config_sources
    assert [(s.provider, s.schema) for s in sources] == [
        ("hydra", "pkg"),
        ("main", "file"),
        (internals.CONFIG_DIR_PROVIDER, "file"),
        ("schema", "structured"),
    ]
    assert internals.config_dir_of(sources) == config_dir
    with internals.initialized("launcher", conf_search_path(), None):
        cfg = compose("config", overrides=prepare_overrides([], None)[1], return_hydra_config=True)
    assert internals.config_dir_of(cfg.hydra.runtime.config_sources) is None


def test_what_hydras_frames_say_of_a_config_that_does_not_compose(tmp_path: Path) -> None:
    config_dir = _config_dir(tmp_path)
    with internals.initialized("launcher", conf_search_path(), config_dir):
        with pytest.raises(RecursionError) as cycle:
            compose("config", overrides=prepare_overrides(["model=a"], config_dir)[1])
        with pytest.raises(UnicodeDecodeError) as latin:
            compose("config", overrides=prepare_overrides(["+recipe=latin"], config_dir)[1])
    assert internals.defaults_cycle(cycle.value) == ["model/a", "model/b", "model/a"]
    assert internals.defaults_cycle(RecursionError()) is None
    assert internals.file_being_read(latin.value) == str(config_dir / "recipe" / "latin.yaml")
    assert internals.file_being_read(ValueError()) is None


def test_completion_shells_and_the_bash_script(capsys: Any) -> None:
    from hydra._internal.core_plugins.bash_completion import BashCompletion

    assert internals.completion_shells() == ["bash", "fish", "zsh"]
    BashCompletion(config_loader=None).install()  # type: ignore[arg-type]
    assert capsys.readouterr().out.count(internals.BASH_PYTHON_BRANCH) == 1


def test_composing_once_hands_a_run_the_checked_composition(tmp_path: Path, monkeypatch) -> None:
    """Inside composing_once, a run's composition of the checked overrides followed by Hydra's
    settings (SETTLED_AFTER: its run folder, its mode) is the checked composition with them
    applied: the same config, hydra node and records included, as Hydra composes it itself (here
    outside composing_once); Hydra's question for the mode (a MULTIRUN composition without the
    sweep check) gets the same answer. Anything else after the checked overrides (a key of the
    job's config, a group option) is composed anew, and so is everything outside."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    config_dir = _config_dir(tmp_path)
    checked = prepare_overrides(["global_batch=48", *QUIET], config_dir)[1]
    settled = [f"hydra.run.dir='{tmp_path / 'a b'}'", "hydra.mode=RUN"]

    def load(overrides: list[str], mode: RunMode = RunMode.RUN, check: bool = True) -> Any:
        with internals.initialized("launcher", conf_search_path(), config_dir):
            loader = GlobalHydra.instance().hydra.config_loader  # type: ignore[union-attr]
            return loader.load_configuration("config", overrides, mode, True, check)

    expected = OmegaConf.to_container(load([*checked, *settled]))
    composed: list[list[str]] = []
    compose_for_real = ConfigLoaderImpl._load_configuration_impl

    def composes(self: Any, **kwargs: Any) -> Any:
        composed.append(kwargs["overrides"])
        return compose_for_real(self, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "_load_configuration_impl", composes)
    with internals.composing_once():
        assert load(checked).global_batch == 48
        asked = load([*checked, settled[0]], RunMode.MULTIRUN, check=False)
        assert asked.hydra.mode is None
        assert asked.hydra.run.dir == str(tmp_path / "a b")
        assert OmegaConf.to_container(load([*checked, *settled])) == expected
        assert composed == [checked]
        assert load([*checked, "seed=3"]).seed == 3
        assert load([*checked, *settled, "hydra/job_logging=default"]).hydra.run.dir
        assert len(composed) == 3
    load(checked)
    assert len(composed) == 4

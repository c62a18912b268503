"""`python -m launcher` as a Hydra application (launcher/hydra_app.py): Hydra's flags, run and
sweep folders (run_dir as their alias), .hydra/ records, settings honoured or refused in one
line, and nothing written for bad input (a refused resume leaves the run's records as they were).
"""

from __future__ import annotations

import os
import sys

import pytest
import yaml

from launcher.cli import main
from tests.conftest import run_process

PLAN = ["plan_only=true", "memory.probe=false", "trainer.cpu_threads=1"]


def _bad(args: list[str], tmp_path, monkeypatch, capsys) -> str:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launcher: error: "), err
    assert list(tmp_path.iterdir()) == [], "bad input wrote something"
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hydra.foo=1"], "Could not override 'hydra.foo'"),
        (["-cn", "mine"], "--config-name/-cn: the launcher's primary config is its own"),
        (["--config-path", "x"], "--config-path/-cp:"),
        (["--experimental-rerun", "x.pickle"], "it unpickles a file"),
        (["--bogus"], "--bogus: unknown option; options are Hydra's"),
        (["--info", "nonsense"], "invalid choice: 'nonsense'"),
        (["hydra/launcher=nosuch"], "hydra/launcher='nosuch': not available here"),
        (["run_dir=a", "hydra.run.dir=b"], "run_dir is an alias of hydra.run.dir; give one"),
        (["-m", "run_dir=a", "hydra.sweep.dir=b"], "run_dir is an alias of hydra.sweep.dir"),
        (["hydra.job.chdir=true", "trainer.devices=2"], "hydra.job.chdir=true: honoured where"),
        (["+recipe=resnet50", "plan_only=false"], "data.root is not set"),  # found in the job
    ],
)
def test_bad_hydra_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    assert message in _bad(args, tmp_path, monkeypatch, capsys)


def test_a_missing_plugin_names_its_install_command(tmp_path, monkeypatch, capsys) -> None:
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:
        err = _bad(["hydra/launcher=joblib"], tmp_path, monkeypatch, capsys)
        assert "(pip install hydra-joblib-launcher)" in err
    else:
        pytest.skip("hydra-joblib-launcher is installed here")


def test_hydra_run_dir_places_the_run_with_hydras_records(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*PLAN, "global_batch=128", "hydra.run.dir=runs/a"]) == 0
    run = tmp_path / "runs" / "a"
    assert {p.name for p in run.iterdir()} >= {".hydra", "plan.json", "config.yaml"}
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert overrides == ["+recipe@_global_=mnist1d", *PLAN, "global_batch=128"]
    hydra = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra["run"]["dir"] == "runs/a" and hydra["job"]["name"] == "launcher"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["run_dir"] == str(run)  # the launcher's record names Hydra's folder
    assert main([*PLAN, "global_batch=128", "run_dir=runs/b"]) == 0  # the alias
    assert (tmp_path / "runs" / "b" / ".hydra" / "overrides.yaml").exists()


def test_a_sweep_goes_to_hydra_sweep_dir_one_folder_per_job(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    sweep = ["-m", *PLAN, "global_batch=64,128", "hydra.sweep.dir=sw"]
    assert main([*sweep, "hydra.sweep.subdir=b${global_batch}"]) == 0
    for batch in (64, 128):
        job = tmp_path / "sw" / f"b{batch}"
        assert (job / "plan.json").exists() and (job / ".hydra" / "overrides.yaml").exists()
    assert (tmp_path / "sw" / "multirun.yaml").exists()
    assert main(["-m", *PLAN, "global_batch=64,128", "run_dir=alias"]) == 0
    assert sorted(p.name for p in (tmp_path / "alias").iterdir()) == ["0", "1", "multirun.yaml"]


def test_without_a_folder_the_launchers_default_layout(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*PLAN]) == 0
    (run,) = (tmp_path / "outputs" / "mnist1d").iterdir()
    assert (run / ".hydra" / "config.yaml").exists() and (run / "plan.json").exists()


def test_chdir_is_honoured_where_one_process_trains(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        assert main([*PLAN, "hydra.run.dir=here", "hydra.job.chdir=true"]) == 0
    finally:
        os.chdir(tmp_path)
    assert (tmp_path / "here" / "plan.json").exists()


def test_flags_that_show_and_train_nothing(tmp_path) -> None:
    def launcher(*args: str):
        res = run_process([sys.executable, "-m", "launcher", *args], tmp_path)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert launcher("--version").startswith("Hydra ")
    job = yaml.safe_load(launcher("--cfg", "job", "global_batch=77", "+recipe=gpt_small"))
    assert job["global_batch"] == 77 and job["model"]["name"] == "gpt"
    assert "hydra/job_logging/launcher" in launcher("--info", "defaults")
    assert "Hydra (" in launcher("--hydra-help")
    assert "usage: python -m launcher" in launcher("--help")  # the launcher's own help
    assert list(tmp_path.iterdir()) == []

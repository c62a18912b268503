"""`python -m launcher` as a Hydra application (launcher/hydra_app.py): Hydra's flags, run and
sweep folders (run_dir as their alias), .hydra/ records, settings honoured or refused in one
line, and nothing written for bad input (a refused resume leaves the run's records as they were).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import __version__
from launcher.cli import main
from tests.helpers import (
    PARITY_ARGS,
    ROOT,
    final_state,
    read_metrics,
    refused_in_process,
    run_cli,
    run_process,
    torchrun,
)

PLAN = ["plan_only=true", "memory.probe=false", "trainer.cpu_threads=1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hydra.foo=1"], "Could not override 'hydra.foo'"),
        (["-cn", "mine"], "--config-name/-cn: the launcher's primary config is its own"),
        (["--config-path", "x"], "--config-path/-cp:"),
        (["--experimental-rerun", "x.pickle"], "it unpickles a file"),
        (["--bogus"], "--bogus: unknown option; options are Hydra's"),
        (["--info", "nonsense"], "invalid choice: 'nonsense'"),
        (["-m", "hydra/launcher=nosuch"], "hydra/launcher='nosuch': not supported; choose basic"),
        (["-m", "hydra/sweeper=ax"], "hydra/sweeper='ax': not supported; choose basic (a grid)"),
        (["hydra/launcher=joblib"], "hydra/launcher=joblib: runs the jobs of a sweep; add -m"),
        (["hydra/sweeper=optuna"], "hydra/sweeper=optuna: runs the jobs of a sweep; add -m"),
        (["-m", "hydra/launcher=joblib", "trainer.devices=2"], "runs one process per job; for"),
        (["-m", "hydra/launcher=submitit_slurm"], "cluster.nodes=auto: a Slurm job needs the"),
        (
            ["-m", "hydra/launcher=submitit_slurm", "cluster=a100x8", "hydra.launcher.nodes=3"],
            "hydra.launcher.nodes: the launcher sets it from cluster.nodes; set that instead",
        ),
        (
            ["-m", "hydra/launcher=submitit_slurm", "cluster=a100x8", "slurm.time=60,120"],
            "with hydra/launcher=submitit_slurm a sweep cannot vary slurm.*",
        ),  # one Slurm job shape and limit per sweep
        (
            ["-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=minimize"],
            "hydra.sweeper.direction=minimize: objective=eval_accuracy is to maximize",
        ),
        (
            ["objective=samples_to_target", "target_accuracy=null"],
            "objective='samples_to_target': needs target_accuracy",
        ),
        (["-m", "global_batch=interval(64,128)"], "global_batch=64.0: must be an integer"),
        (["slurm.extra=--qos=high"], "'slurm.extra=--qos=high': not an override Hydra can read"),
        (["--cfg", "job", "nosuch=1"], "Could not override 'nosuch'"),  # shown, so checked too
        (["run_dir=a", "hydra.run.dir=b"], "run_dir is an alias of hydra.run.dir; give one"),
        (["-m", "run_dir=a", "hydra.sweep.dir=b"], "run_dir is an alias of hydra.sweep.dir"),
        (["hydra.job.chdir=true", "trainer.devices=2"], "hydra.job.chdir=true: honoured where"),
        (["+recipe=resnet50", "plan_only=false"], "data.root is not set"),  # found in the job
        (["-sc"], "--shell-completion: give one of install, uninstall, query=SHELL (SHELL: bash"),
        (["-sc", "install=tcsh"], "--shell-completion install=tcsh: give one of install"),
        (["-sc", "query=bash", "x=1"], "--shell-completion query=bash x=1: give one of"),
        (["-sc", "query=bash"], "the installed completion runs it, with the line being"),
        (["-sc", "install=bash", "-m"], "-m and --shell-completion: give one of --run, -m, --cfg"),
        (["--cfg", "job", "--info"], "--cfg and --info: give one of"),  # Hydra: a traceback
        (["--resolve"], "--resolve: only with --cfg"),
    ],
)
def test_bad_hydra_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    assert message in refused_in_process(args, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(
    ("option", "install"),
    [
        ("hydra/launcher/joblib", "pip install 'globalbatch[joblib]'"),
        ("hydra/launcher/submitit_slurm", "pip install 'globalbatch[slurm]'"),
        ("hydra/sweeper/optuna", "pip install 'globalbatch[search]'"),
    ],
)
def test_a_missing_plugin_names_its_install_command(option, install) -> None:
    """What Hydra raises when the option's plugin is not installed, as the launcher says it (the
    plugins are installed here, so the error is made as Hydra makes it)."""
    from hydra.errors import MissingConfigException

    from launcher.config.compose import _hydra_error

    error = _hydra_error(MissingConfigException("not found", missing_cfg_file=option))
    group, _, name = option.rpartition("/")
    assert str(error) == f"{group}={name!r}: not available here ({install})"


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


def test_torchruns_rendezvous_id_names_the_default_folder(tmp_path, monkeypatch, capsys) -> None:
    """Under torchrun --rdzv-id=ID (TORCHELASTIC_RUN_ID in its workers, the same in every
    restart) the default folder is outputs/<recipe>/torchrun-ID, found again, never suffixed;
    torchrun's `none` (no --rdzv-id) and trainer.devices workers keep the launch time, and a
    restart without an id says that it starts over; an id that cannot name a folder is one line."""
    from launcher.training.run_folder import reuses_run_dir, run_stamp

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert (run_stamp(), reuses_run_dir(None)) == ("torchrun-job-7", True)
    assert main([*PLAN]) == 0
    assert [p.name for p in (tmp_path / "outputs" / "mnist1d").iterdir()] == ["torchrun-job-7"]
    capsys.readouterr()
    assert main([*PLAN]) == 2  # a restart finds it (plan_only refuses a folder with a run)
    assert "torchrun-job-7': already holds a run" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setenv("SLURM_JOB_ID", "41")
        assert run_stamp() == "slurm-41"  # a requeue is a new torchrun: the job's id holds
        m.setenv("TORCHELASTIC_RUN_ID", "../up")
        m.delenv("SLURM_JOB_ID")
        (tmp_path / "bad").mkdir()
        line = refused_in_process([*PLAN], tmp_path / "bad", monkeypatch, capsys)
        assert line.startswith("launcher: error: TORCHELASTIC_RUN_ID='../up' (torchrun --rdzv-id)")
    for env in ({"TORCHELASTIC_RUN_ID": "none"}, {"LAUNCHER_SPAWNED": "1"}):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert re.fullmatch(r"[0-9_-]+", run_stamp()) and not reuses_run_dir(None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main([*PLAN]) == 0
    err = capsys.readouterr().err
    assert "(restart 1) without --rdzv-id: its default run folder is a new one, so it starts" in err


def test_chdir_is_honoured_where_one_process_trains(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        assert main([*PLAN, "hydra.run.dir=here", "hydra.job.chdir=true"]) == 0
    finally:
        os.chdir(tmp_path)
    assert (tmp_path / "here" / "plan.json").exists()


@pytest.mark.slow
def test_flags_that_show_and_train_nothing(tmp_path) -> None:
    def launcher(*args: str):
        res = run_process([sys.executable, "-m", "launcher", *args], tmp_path)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert launcher("--version").splitlines() == [f"globalbatch {__version__}", "Hydra 1.3.8"]
    job = yaml.safe_load(launcher("--cfg", "job", "global_batch=77", "+recipe=gpt_small"))
    assert job["global_batch"] == 77 and job["model"]["name"] == "gpt"
    assert "hydra/job_logging/launcher" in launcher("--info", "defaults")
    assert "Hydra (" in launcher("--hydra-help")
    assert "usage: python -m launcher" in launcher("--help")  # the launcher's own help
    assert list(tmp_path.iterdir()) == []


def test_the_version_is_the_installed_distributions_or_the_source_trees(monkeypatch) -> None:
    from importlib import metadata

    from launcher import flags

    project = (ROOT / "pyproject.toml").read_text()  # tomllib is Python 3.11's; 3.10 is supported
    assert re.search(r'^name = "(.*)"\nversion = "(.*)"$', project, re.M).groups() == (
        flags.DISTRIBUTION,
        __version__,
    )

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    line = flags.version().splitlines()[0]
    assert line == f"globalbatch {__version__} (not installed: the source tree at {ROOT})"
    monkeypatch.setattr(metadata, "version", lambda name: "9.9")
    assert flags.version().startswith(f"globalbatch {__version__} (the source tree at {ROOT}; 9.9")


def test_the_completion_script_of_python_m_launcher_is_bash(tmp_path, monkeypatch, capsys):
    """Run as python -m launcher, the script Hydra writes also completes `python -m launcher`
    (bash -n: it parses); as the installed command, it is Hydra's own for that command."""
    from launcher import flags

    monkeypatch.setattr(sys, "argv", [str(ROOT / "launcher" / "__main__.py")])
    assert main(["-sc", "install=bash"]) == 0
    script = tmp_path / "complete.sh"
    script.write_text(capsys.readouterr().out)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert flags.MODULE_BRANCH in script.read_text()
    assert script.read_text().endswith("-F hydra_bash_completion python\n")
    assert flags.query_line("python3.11 -m launcher  tra") == "launcher  tra"
    assert flags.query_line("globalbatch -m tra") == "globalbatch -m tra"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/globalbatch"])
    assert main(["-sc", "install=bash"]) == 0
    own = capsys.readouterr().out
    assert flags.MODULE_BRANCH not in own and own.endswith("hydra_bash_completion globalbatch\n")


@pytest.mark.slow
def test_bash_completes_python_m_launcher(tmp_path) -> None:
    """The installed completion in a real bash: the function Hydra's script registers for
    `python`, called as bash calls it, asks `python -m launcher -sc query=bash`."""
    complete = """eval "$(python -m launcher -sc install=bash)"
for line in "python -m launcher tra" "python -m launcher trainer.ep" "python -m launcher +rec"; do
  COMP_LINE="$line"; COMP_POINT=${#line}; words=($line); COMP_CWORD=$((${#words[@]} - 1))
  COMPREPLY=(); hydra_bash_completion; echo "${COMPREPLY[*]}"
done
"""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    res = run_process(["bash", "-c", complete], tmp_path, env={"PATH": path})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["trainer. trainer=", "trainer.epochs=", "+recipe="]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_joblib_runs_a_sweeps_jobs_in_worker_processes(one_rank_reference, tmp_path, data_cache):
    """hydra/launcher=joblib: two jobs of the same global batch in joblib's worker processes, each
    with Hydra's records, each equal to one process's training (float64, 1e-10)."""
    import torch

    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16,32"]
    res = run_cli(["-m", "hydra/launcher=joblib", *args, "hydra.sweep.dir=sw"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Joblib.Parallel(" in res.stdout + res.stderr
    for job, micro in (("0", 16), ("1", 32)):
        run = tmp_path / "sw" / job
        assert f"micro_batch={micro}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert (run / "launcher.log").exists() and (run / ".hydra" / "config.yaml").exists()
        for name, value in one_rank_reference.items():
            torch.testing.assert_close(final_state(run)[name], value, atol=1e-10, rtol=0)


def test_an_error_in_a_plugins_process_comes_back_as_one_line() -> None:
    """A job's error in a joblib worker or a submitit task travels pickled inside Hydra's job
    result and arrives as Failed, which cli.py turns into one line and the launcher's exit code."""
    import pickle

    from launcher.cluster.spawn import WorkersFailed
    from launcher.errors import ConfigError
    from launcher.hydra_app import Carried, Failed

    for error in (ConfigError("objective='eval_accuracy': no accuracy"), WorkersFailed(3, "x")):
        back = pickle.loads(pickle.dumps(Carried(error)))
        assert isinstance(back, Failed) and type(back.error) is type(error)
        assert str(back.error) == str(error)
    assert pickle.loads(pickle.dumps(WorkersFailed(3, "x"))).code == 3


def test_submitit_slurm_gets_its_shape_and_resources_from_the_cluster() -> None:
    from launcher.cluster.plugins import submitit_settings
    from launcher.config.compose import compose_run

    extra = ["slurm.partition=gpu", "slurm.extra=--qos high --exclusive", "slurm.time=90"]
    cfg = compose_run(["cluster=h100x256", *extra])
    found = submitit_settings([cfg], [])
    add = "+hydra.launcher.additional_parameters"
    assert found == [
        "hydra.launcher.nodes=32",
        "hydra.launcher.tasks_per_node=8",  # one Slurm task per device (topology.slurm_env)
        "hydra.launcher.signal_delay_s=120",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.gpus_per_node=8",
        "hydra.launcher.partition=gpu",
        f"{add}.mem-per-gpu='80G'",
        f"{add}.time='90'",
        f"{add}.requeue=true",
        f"{add}.qos='high'",
        f"{add}.exclusive=true",
    ]


def test_an_interval_is_checked_at_both_ends() -> None:
    from launcher.config.compose import split_sweep

    jobs = split_sweep(["optim.base_lr=tag(log, interval(0.01, 0.1))", "global_batch=64,128"])
    assert jobs == [
        ["optim.base_lr=0.01", "global_batch=64"],
        ["optim.base_lr=0.01", "global_batch=128"],
        ["optim.base_lr=0.1", "global_batch=64"],
        ["optim.base_lr=0.1", "global_batch=128"],
    ]


@pytest.mark.slow
def test_an_optuna_search_returns_each_jobs_objective(tmp_path, data_cache) -> None:
    """hydra/sweeper=optuna over lr x global batch: a small real study (3 trials). The best
    trial's value is the best of the jobs' final eval accuracies as their metrics.jsonl hold
    them, the direction is the objective's, and the report reads the folder as a grid's."""
    small = [f"data.cache_dir={data_cache}", "data.num_samples=2000", "trainer.epochs=0.5"]
    search = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1"]
    space = ["optim.base_lr=interval(0.01,0.1)", "global_batch=choice(32,64)"]
    quiet = ["trainer.progress=false", "trainer.tensorboard=false", "hydra.sweep.dir=sw"]
    res = run_cli(["-m", *search, *space, *small, *quiet], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Directions: ['maximize']" in res.stdout + res.stderr
    sweep = tmp_path / "sw"
    accuracy = {
        job.name: [r for r in read_metrics(job) if "eval_accuracy" in r][-1]["eval_accuracy"]
        for job in sweep.iterdir()
        if job.is_dir()
    }
    assert sorted(accuracy) == ["0", "1", "2"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(accuracy.values())
    chosen = [f"{k}={v}" for k, v in results["best_params"].items()]
    (best,) = [  # the trial Optuna names: the job that ran those values, and its accuracy
        job
        for job in accuracy
        if set(chosen) <= set(yaml.safe_load((sweep / job / ".hydra/overrides.yaml").read_text()))
    ]
    assert accuracy[best] == results["best_value"]
    report = run_process([sys.executable, "-m", "launcher.report", str(sweep)], tmp_path)
    assert report.returncode == 0, report.stderr
    line = f"- Search (optuna): best objective {results['best_value']:.6g} at "
    assert line in report.stdout and f"(job {best})." in report.stdout


@pytest.mark.slow
def test_every_rank_resumes_from_a_sweep_jobs_own_subdir(one_rank_reference, tmp_path, data_cache):
    """torchrun x 2 ranks, -m with hydra.sweep.subdir=b${global_batch}: rank 1's Hydra folder is
    scratch, and it must look for the checkpoint where rank 0 trains (sw/b64, not sw/0). Stopped
    after step 3, then resumed: both ranks go on from step 3 and end with one process's
    parameters (a rank that started over would not)."""
    import torch

    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16"]
    sweep = ["-m", *args, "hydra.sweep.dir=sw", "hydra.sweep.subdir=b${global_batch}"]
    two = [sys.executable, *torchrun()]
    first = run_cli([*sweep, "trainer.stop_after_samples=192"], tmp_path, prefix=two)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(sweep, tmp_path, prefix=[sys.executable, *torchrun()])
    assert again.returncode == 0, again.stderr[-3000:]
    run = tmp_path / "sw" / "b64"
    assert "resuming from" in again.stdout and not (tmp_path / "sw" / "0").exists()
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5]
    for name, value in one_rank_reference.items():
        torch.testing.assert_close(final_state(run)[name], value, atol=1e-10, rtol=0)


@pytest.mark.slow
def test_a_search_reads_the_objective_of_trainer_devices_workers(tmp_path, data_cache) -> None:
    """trainer.devices=2 under the optuna sweeper: the job's workers train, and the objective
    comes from the records their rank 0 wrote in the job's folder."""
    small = [f"data.cache_dir={data_cache}", "data.num_samples=2000", "trainer.epochs=0.2"]
    small.append("global_batch=64")
    search = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", "objective=eval_loss"]
    quiet = ["trainer.progress=false", "trainer.tensorboard=false", "hydra.sweep.dir=sw"]
    args = ["-m", *search, "optim.base_lr=interval(0.01,0.1)", "trainer.devices=2", *small]
    res = run_cli([*args, *quiet], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"world_size": 2' in (tmp_path / "sw" / "0" / "plan.json").read_text()
    results = yaml.safe_load((tmp_path / "sw" / "optimization_results.yaml").read_text())
    evals = [r for r in read_metrics(tmp_path / "sw" / "0") if "eval_loss" in r]
    assert results["best_value"] == evals[-1]["eval_loss"]

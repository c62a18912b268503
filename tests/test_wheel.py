"""The launcher as a pip user has it: the wheel, installed, run from folders outside the repo.

Every command here runs the wheel's `launcher` (fixture `wheel_python`, conftest.py), in a
temporary folder, with no path into this checkout. The examples/ project is copied out of the
repo and trained through every launch path: its stated accuracy is >= 95% on the evaluation split
(6 epochs; 97.5-98% measured on seeds 0-2, README "Your own model and data").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import (
    ROOT,
    accelerate_launch,
    checkout_copy,
    free_port,
    read_metrics,
    torchrun,
    wheel_env,
)

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "waves"
ACCURACY = 0.95
QUIET = ["trainer.progress=false"]


def run(python: Path, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """`python ARGS` in `cwd` with the wheel's environment (and `env` on top)."""
    return subprocess.run(
        [str(python), *args],
        cwd=cwd,
        env=wheel_env() | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def project(tmp_path) -> Path:
    """examples/waves copied to a folder outside the repository."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "waves"))


def accuracy(run_dir: Path) -> float:
    return [m for m in read_metrics(run_dir) if "eval_accuracy" in m][-1]["eval_accuracy"]


def test_the_wheel_holds_code_config_recipes_and_templates(wheel_python, tmp_path):
    (wheel,) = wheel_python.parent.parent.parent.glob("globalbatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"launcher/{p.relative_to(ROOT / 'launcher')}" for p in ROOT.glob("launcher/**/*.py")
    }
    expected |= {
        f"launcher/conf/{p.relative_to(ROOT / 'conf')}" for p in ROOT.glob("conf/**/*.yaml")
    }
    expected |= {f"launcher/recipes/{p.name}" for p in ROOT.glob("recipes/*.yaml")}
    expected |= {f"launcher/slurm_templates/{p.name}" for p in ROOT.glob("slurm/*.sbatch")}
    assert expected - names == set()
    metadata = zipfile.ZipFile(wheel).read("globalbatch-0.1.0.dist-info/METADATA").decode()
    assert "Name: globalbatch\n" in metadata and "License-Expression: MIT\n" in metadata
    entry = zipfile.ZipFile(wheel).read("globalbatch-0.1.0.dist-info/entry_points.txt").decode()
    assert "globalbatch = launcher.cli:console" in entry
    where = run(wheel_python, ["-c", "import launcher; print(launcher.__file__)"], tmp_path)
    assert where.returncode == 0, where.stderr
    assert str(wheel_python.parent.parent) in where.stdout and str(ROOT) not in where.stdout


def test_help_plan_train_and_render_from_outside_the_repo(wheel_python, tmp_path):
    helped = run(wheel_python.parent / "globalbatch", ["--help"], tmp_path)  # the console command
    assert helped.returncode == 0, helped.stderr
    assert "(cifar10, gpt_small, mnist1d, resnet50, resnet50_lars)" in helped.stdout
    assert "model=cnn1d|gpt|mlp|resnet50;" in helped.stdout
    plan = ["-m", "launcher", "+recipe=resnet50", "plan_only=true", "cluster=h100x256"]
    planned = run(wheel_python, [*plan, "run_dir=plan"], tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["world_size"] == 256
    short = ["trainer.epochs=2", "data.num_samples=4000", "run_dir=train", *QUIET]
    trained = run(wheel_python, ["-m", "launcher", *short], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "test accuracy" in trained.stdout and (tmp_path / "train" / "model_final.pt").exists()
    rendered = run(
        wheel_python, ["-m", "launcher.slurm", "cluster=a100x8", "run_dir=job"], tmp_path
    )
    assert rendered.returncode == 0, rendered.stderr
    script = (tmp_path / "job" / "job.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=8" in script and "trainer.devices=" in script
    assert f"export LAUNCHER_PYTHON={wheel_python}" in script


def test_the_example_trains_on_one_process_and_records_its_targets(wheel_python, project):
    res = run(
        wheel_python,
        ["-m", "launcher", "--config-dir", "conf", "+recipe=waves", "run_dir=run", *QUIET],
        project,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert accuracy(project / "run") >= ACCURACY
    config = yaml.safe_load((project / "run" / "config.yaml").read_text())
    assert config["model"]["_target_"] == "waves.model.WaveNet"
    assert config["data"]["_target_"] == "waves.data.make_waves"
    assert config["loss"] == {
        "_target_": "torch.nn.CrossEntropyLoss",
        "reduction": "none",
        "label_smoothing": 0.05,
    }
    plan = json.loads((project / "run" / "plan.json").read_text())
    assert plan["epoch_samples"] == 4096 and plan["memory"]["source"] == "measured"
    assert "batch-size advice" in res.stdout and "recommended global batch" in res.stdout
    assert any("noise_scale" in m for m in read_metrics(project / "run"))


def test_a_target_that_does_not_import_is_one_line_from_a_real_process(wheel_python, project):
    res = run(
        wheel_python,
        [
            "-m",
            "launcher",
            "--config-dir",
            "conf",
            "+recipe=waves",
            "model._target_=waves.nope.Net",
        ],
        project,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stdout == ""
    assert res.stderr.splitlines() == [
        "launcher: error: model._target_='waves.nope.Net': no module named 'waves.nope'"
    ], res.stderr
    assert not (project / "outputs").exists()


LAUNCHES = {  # (the command's words after python, made at the launch: ports free then)
    "trainer.devices=2": (lambda: ["-m", "launcher"], ["trainer.devices=2"], 2),
    "torchrun": (lambda: [*torchrun(), "-m", "launcher"], [], 2),
    "accelerate launch": (lambda: [*accelerate_launch(), "-m", "launcher"], [], 2),
    "backend=deepspeed": (lambda: ["-m", "launcher"], ["backend=deepspeed"], 1),
    "deepspeed CLI": (
        lambda: (
            ["-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
            + ["--master_port", str(free_port()), "--module", "launcher"]
        ),
        ["backend=deepspeed", "backend.zero_stage=1"],
        2,
    ),
}


@pytest.mark.parametrize("how", list(LAUNCHES))
def test_every_launch_path_trains_the_users_model(wheel_python, project, how):
    prefix, extra, world = LAUNCHES[how]
    args = [*prefix(), "--config-dir", "conf", "+recipe=waves", *extra, "run_dir=run", *QUIET]
    res = run(wheel_python, args, project)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads((project / "run" / "plan.json").read_text())
    assert plan["world_size"] == world
    config = yaml.safe_load((project / "run" / "config.yaml").read_text())
    assert config["model"]["_target_"] == "waves.model.WaveNet"  # never a built-in
    assert accuracy(project / "run") >= ACCURACY


def test_the_example_resumes_after_a_kill_where_it_would_have_been(wheel_python, project):
    """SIGKILL after step 40 of 96 (a checkpoint every 8,192 samples = 32 steps); the rerun
    resumes from step 32 and ends bit-identical to an uninterrupted run."""
    common = ["-m", "launcher", "--config-dir", "conf", "+recipe=waves", *QUIET]
    common += ["checkpoint.every_samples=8192"]
    whole = run(wheel_python, [*common, "run_dir=whole"], project)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(wheel_python, [*common, "run_dir=run"], project, {"LAUNCHER_TEST_KILL": "40:step"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run(wheel_python, [*common, "run_dir=run"], project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 32 of 96" in resumed.stdout
    ref = torch.load(project / "whole" / "model_final.pt", weights_only=True)
    got = torch.load(project / "run" / "model_final.pt", weights_only=True)
    for name, value in ref.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize(
    ("extra", "env", "event"),
    [
        ([], {"LAUNCHER_TEST_OOM": "0:3:64"}, "out_of_memory"),
        (["ramp.start_batch=64", "ramp.samples=8192"], {}, "ramp"),
        (["model.activation_checkpointing=true"], {}, None),
    ],
    ids=["oom-recovery", "ramp-up", "activation-checkpointing"],
)
def test_the_launchers_features_work_on_the_users_model(wheel_python, project, extra, env, event):
    args = ["-m", "launcher", "--config-dir", "conf", "+recipe=waves", *extra, "run_dir=run"]
    res = run(wheel_python, [*args, *QUIET], project, env)
    assert res.returncode == 0, res.stderr[-3000:]
    events = {m.get("event") for m in read_metrics(project / "run")}
    assert event is None or event in events
    assert accuracy(project / "run") >= ACCURACY


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_examples_script_trains_through_launcher_run(wheel_python, project, ranks):
    prefix = torchrun()
    res = run(
        wheel_python, [*(prefix if ranks == 2 else []), "train.py", "run_dir=run", *QUIET], project
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert sum(line.startswith("accuracy ") for line in lines) == ranks  # each rank's result
    assert json.loads((project / "run" / "plan.json").read_text())["world_size"] == ranks
    assert accuracy(project / "run") >= ACCURACY


def test_the_readme_commands_run_inside_a_checkout_beside_an_installed_wheel(
    wheel_python, tmp_path
):
    """README "Install": `pip install .`, then `python -m launcher` inside the checkout, whose
    launcher/ comes first on sys.path and shadows the installed package: the configs come from
    the checkout's own conf/, recipes/ and slurm/."""
    checkout = checkout_copy(tmp_path / "checkout")
    helped = run(wheel_python, ["-m", "launcher", "--help"], checkout)
    assert helped.returncode == 0, helped.stderr
    assert "(cifar10, gpt_small, mnist1d, resnet50, resnet50_lars)" in helped.stdout
    plan = ["-m", "launcher", "+recipe=resnet50", "plan_only=true", "cluster=h100x256"]
    planned = run(wheel_python, [*plan, f"run_dir={tmp_path / 'plan'}"], checkout)
    assert planned.returncode == 0, planned.stderr
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["world_size"] == 256
    where = ["-m", "launcher.slurm", "cluster=a100x8", f"run_dir={tmp_path / 'job'}"]
    rendered = run(wheel_python, where, checkout)
    assert rendered.returncode == 0, rendered.stderr
    assert "#SBATCH --gpus-per-node=8" in (tmp_path / "job" / "job.sbatch").read_text()
    sources = yaml.safe_load((tmp_path / "plan" / ".hydra" / "hydra.yaml").read_text())
    paths = [s["path"] for s in sources["hydra"]["runtime"]["config_sources"]]
    assert str(checkout / "conf") in paths

"""Shared fixtures: a small MNIST-1D cache, and helpers that run the launcher as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL_DATA = ["data.num_samples=2000"]  # 1,600 train / 400 test, generated in well under a second


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A per-session MNIST-1D cache directory, so tests never touch the user's cache."""
    return str(tmp_path_factory.mktemp("mnist1d-cache"))


def composed(overrides: list[str], device: str = "cpu"):
    """compose_run with the device's `auto` settings resolved, as a run resolves them
    (launcher.job.on_device): what the building blocks (probe, backends) accept."""
    from launcher.compose import compose_run
    from launcher.job import on_device

    return on_device(compose_run(overrides), device)


TEST_HOME = tempfile.mkdtemp(prefix="launcher-tests-home-")  # caches under ~ stay out of $HOME


def launcher_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["HOME"] = TEST_HOME
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def accelerate_launch(port: int) -> list[str]:
    """`accelerate launch` arguments for 2 CPU processes on gloo (its --cpu flag would start one,
    shared/notes/environment-facts.md)."""
    return [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]


def run_cli(
    args: list[str],
    cwd: Path,
    prefix: list[str] | None = None,
    timeout: int = 600,
    env: dict[str, str] | None = None,
):
    """Run `python -m launcher ARGS` (or PREFIX -m launcher ARGS) in `cwd`; returns the result."""
    return run_process((prefix or [sys.executable]) + ["-m", "launcher", *args], cwd, timeout, env)


def run_process(cmd: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run `cmd` in `cwd` with the tests' environment (and `env` on top); returns the result."""
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=launcher_env() | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


PARITY_ARGS = [
    *SMALL_DATA,
    "global_batch=64",
    "trainer.epochs=0.2",
    "trainer.dtype=float64",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.log_every=1",
]  # 0.2 x 1,600 / 64 = 5 steps, all inside the warmup


def final_state(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "model_final.pt")


@pytest.fixture(scope="session")
def one_rank_reference(tmp_path_factory, data_cache) -> dict:
    """PARITY_ARGS trained by one process with micro-batch 32: the parameters every other
    launch of the same global batch must reproduce (float64, 1e-10)."""
    cwd = tmp_path_factory.mktemp("one-rank")
    res = run_cli(
        [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", f"run_dir={cwd / 'run'}"],
        cwd,
    )
    assert res.returncode == 0, res.stderr
    return final_state(cwd / "run")


def skip_or_fail(reason: str) -> None:
    """Skip a test whose system requirements (root, Slurm, network namespaces) are missing; CI
    sets LAUNCHER_REQUIRE_CLUSTER_TESTS=1 so that it fails instead of silently skipping."""
    if os.environ.get("LAUNCHER_REQUIRE_CLUSTER_TESTS") == "1":
        pytest.fail(f"LAUNCHER_REQUIRE_CLUSTER_TESTS=1 but {reason}")
    pytest.skip(reason)


def wheel_env() -> dict[str, str]:
    """The tests' environment without the repository on PYTHONPATH: what a pip user has."""
    env = launcher_env()
    del env["PYTHONPATH"]
    return env


@pytest.fixture(scope="session")
def wheel_python(tmp_path_factory) -> Path:
    """A Python whose `launcher` can come from nothing but the wheel built from this checkout.

    The wheel is built (pip wheel, this environment's setuptools) and installed without its
    dependencies into a new virtual environment; the dependencies (torch, Hydra, DeepSpeed, ...)
    come from this environment's site-packages through a .pth line, whose own .pth files (this
    checkout's editable install among them) are not processed. .ci/run installs the same wheel
    with its dependencies into a fresh environment as well."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root), str(ROOT)],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = root.glob("globalbatch-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run(
        [*pip, "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return python

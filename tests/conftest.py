"""Shared fixtures: a small MNIST-1D cache, the one-process reference run, the built wheel.
The helpers the tests import are in helpers.py."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import PARITY_ARGS, ROOT, final_state, run_cli


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A per-session MNIST-1D cache directory, so tests never touch the user's cache."""
    return str(tmp_path_factory.mktemp("mnist1d-cache"))


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
    # PYTHONPATH left out: a checkout on it shows pip the globalbatch.egg-info that building
    # the wheel writes there, and pip would skip the install as "already satisfied"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [*pip, "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return python

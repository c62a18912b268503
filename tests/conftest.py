"""Shared fixtures: a small MNIST-1D cache, and helpers that run the launcher as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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

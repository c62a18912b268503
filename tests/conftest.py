"""Shared fixtures: a small MNIST-1D cache, the one-rank reference run, the built wheel; the
environment every process of the suite runs in (ONE_THREAD) and the fast tier's rule (no Python
process of its own). The helpers the tests import are in helpers.py."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

# One compute thread per process, in this one (set before numpy and torch start their pools) and,
# through the environment, in every process a test starts (the launcher, torchrun's and
# mp.spawn's workers). A pool per process sized by the machine's cores multiplies the threads by
# the processes running at once: where a job beside the suite holds the rest of a task limit
# (a container's pids.max, a user's ulimit -u), creating a thread fails with EAGAIN,
# "Resource temporarily unavailable", in ProcessGroupGloo(...) or in fork. The suite's models are
# small: one thread is also the faster setting on a shared 2-core machine.
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",  # torch's intra-op pool (OpenMP)
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",  # numpy's BLAS, sized at import
    "TORCHINDUCTOR_COMPILE_THREADS": "1",  # Inductor compiles in the process: no worker pool
    "RAYON_NUM_THREADS": "1",  # the tokenizers library's pool
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(ONE_THREAD)

from tests.helpers import (  # noqa: E402
    FAILED_PROCESSES,
    PARITY_ARGS,
    ROOT,
    final_state,
    first_errors,
    train_here,
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test's report gets the first error lines of every process it ran that failed
    (helpers.run_process): a rank's abort or traceback, which the test's message (the stderr's
    tail, torchrun's summary) does not show."""
    report = yield
    if call.when == "setup":
        FAILED_PROCESSES.clear()
    elif report.failed and call.when == "call":
        for i, result in enumerate(FAILED_PROCESSES):
            command = " ".join(str(part) for part in result.args)[:300]
            head = f"exit code {result.returncode}: {command}"
            report.sections.append((f"failed process {i + 1}", f"{head}\n{first_errors(result)}"))
    return report


@pytest.fixture(autouse=True)
def fast_tier_starts_no_python(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test not marked slow starts no Python process (a launcher, torchrun, mp.spawn's
    workers): each costs seconds of start-up, and those are the slow tier's. Tools (mount,
    scontrol) and DataLoader's forked workers are allowed."""
    if request.node.get_closest_marker("slow"):
        return
    import multiprocessing.process

    def refuse(what: str) -> None:
        raise RuntimeError(
            f"{request.node.nodeid} starts {what}: a test of the fast tier (-m 'not slow') starts "
            "no Python process; mark it @pytest.mark.slow, or run the launcher in this process "
            "(tests/helpers.py train_here)"
        )

    popen, start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def checked_popen(self: subprocess.Popen[Any], args: Any, *more: Any, **kwargs: Any) -> None:
        first = args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), "")
        name = os.path.basename(os.fsdecode(first).split()[0] if first else "")
        if name.startswith("python") or os.fsdecode(first) == sys.executable:
            refuse(f"a Python process ({name})")
        popen(self, args, *more, **kwargs)

    def checked_start(self: multiprocessing.process.BaseProcess) -> None:
        if getattr(self, "_start_method", None) == "spawn":
            refuse("a spawned Python process (multiprocessing)")
        start(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_popen)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", checked_start)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A per-session MNIST-1D cache directory, so tests never touch the user's cache."""
    return str(tmp_path_factory.mktemp("mnist1d-cache"))


@pytest.fixture(scope="session")
def one_rank_reference(tmp_path_factory, data_cache) -> dict:
    """PARITY_ARGS trained on one rank (in this process) with micro-batch 32: the parameters
    every other launch of the same global batch must reproduce (float64, 1e-10)."""
    cwd = tmp_path_factory.mktemp("one-rank")
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    assert train_here(args, cwd).returncode == 0
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

"""Helpers the tests import: run the launcher as a user would, read what a run wrote, the small
configurations the tests share, data files written as their formats are (text, CIFAR-10). The
fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL_DATA = ["data.num_samples=2000"]  # 1,600 train / 400 test, generated in well under a second


def composed(overrides: list[str], device: str = "cpu"):
    """compose_run with the device's `auto` settings resolved, as a run resolves them
    (launcher.training.job.on_device): what the building blocks (probe, backends) accept."""
    from launcher.config.compose import compose_run
    from launcher.training.job import on_device

    return on_device(compose_run(overrides), device)


TEST_HOME = tempfile.mkdtemp(prefix="launcher-tests-home-")  # caches under ~ stay out of $HOME


def launcher_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["HOME"] = TEST_HOME
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(nproc: int = 2) -> list[str]:
    """`torchrun` arguments (after a python) for NPROC processes on this machine. Its rendezvous
    port is one the OS says is free now: a fixed port is taken while another suite, or another
    test's launch, runs beside this one."""
    port = str(free_port())
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]


def accelerate_launch() -> list[str]:
    """`accelerate launch` arguments for 2 CPU processes on gloo (its --cpu flag would start one,
    shared/notes/environment-facts.md), on a port free now (torchrun's above)."""
    port = free_port()
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


def train_here(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """run_cli in this process: `python -m launcher ARGS` in `cwd`, with the tests' HOME (and
    `env` on top: never a kill); returns its exit code and output as run_cli does. For a run the
    test reads, not one whose process it tests: a process would add its start-up (3-4 s of CPU,
    most of a small run), and the run is the same (one thread in both, ONE_THREAD in
    conftest.py). Not for mixed precision: Accelerate's state is one per process, and the
    in-process runs' is `no`."""
    import contextlib
    import io
    from unittest import mock

    from launcher.cli import main

    assert "LAUNCHER_TEST_KILL" not in (env or {}), "a kill needs a process of its own"
    here, out, err = Path.cwd(), io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, {"HOME": TEST_HOME, **(env or {})}):  # the caches under ~
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
        finally:
            os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# The processes of the running test that ended with a non-zero code (cleared per test by
# conftest.py, which puts their errors into a failing test's report: a test's own message shows
# the stderr's tail, where torchrun's summary hides a rank's first error).
FAILED_PROCESSES: list[subprocess.CompletedProcess[str]] = []


def run_process(cmd: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run `cmd` in `cwd` with the tests' environment (and `env` on top); returns the result."""
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env=launcher_env() | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        FAILED_PROCESSES.append(result)
    return result


ERROR_LINE = re.compile(
    r"terminate called|what\(\)|Error|error:|Traceback|Fatal|Signal \d+|SIG[A-Z]+|enforce fail"
)


def first_errors(result: subprocess.CompletedProcess[str], most: int = 30) -> str:
    """The lines of a failed process's stderr that say what went wrong first (a rank's C++
    abort, a Python error), in order, at most MOST: what a stderr tail of torchrun's failure
    summary leaves out."""
    lines = [line for line in result.stderr.splitlines() if ERROR_LINE.search(line)]
    return "\n".join(lines[:most])


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


def skip_or_fail(reason: str) -> None:
    """Skip a test whose system requirements (root, Slurm, network namespaces) are missing; CI
    sets LAUNCHER_REQUIRE_CLUSTER_TESTS=1 so that it fails instead of silently skipping."""
    if os.environ.get("LAUNCHER_REQUIRE_CLUSTER_TESTS") == "1":
        pytest.fail(f"LAUNCHER_REQUIRE_CLUSTER_TESTS=1 but {reason}")
    pytest.skip(reason)


def checkout_copy(where: Path) -> Path:
    """The files a fresh clone has that the launcher runs from: code, config, recipes, templates."""
    for name in ("launcher", "conf", "recipes", "slurm"):
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / name, where / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", where)
    return where


def wheel_env() -> dict[str, str]:
    """The tests' environment without the repository on PYTHONPATH: what a pip user has."""
    env = launcher_env()
    del env["PYTHONPATH"]
    return env


def refused_in_process(args: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    """`python -m launcher ARGS` in this process, in the empty `tmp_path`: exit 2, one line
    `launcher: error: ...` on stderr, nothing written; returns the line."""
    from launcher.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launcher: error: "), err
    assert list(tmp_path.iterdir()) == [], "bad input wrote something"
    return err


def write_corpus(path: Path, n: int, seed: int = 0) -> bytes:
    words = ["alpha", "beta", "gamma", "delta", "the", "batch", "token", "é"]
    rng = np.random.default_rng(seed)
    text = " ".join(words[i] for i in rng.integers(len(words), size=n)).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    return text


def write_cifar10(root: Path, per_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A stand-in in CIFAR-10's python on-disk format (random pixels, labels 0..9)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        entry = {"batch_label": name, "data": data, "labels": labels, "filenames": []}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    names_meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(names_meta, f, protocol=2)
    return written


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a gloo rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sgd_step_on_rank(
    rank: int, port: int, source, model, global_batch: int, micro: int, workers: int = 0
) -> dict:
    """One plain SGD step (lr 1, no momentum, decay, clipping or warmup) of the real loop on this
    process's rank of 2 gloo ranks, over `source` (launcher/data Source) from `model`; returns
    the parameters after it (on every rank)."""
    import os

    import torch

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(1)
    from launcher.backends import teardown
    from launcher.backends.accelerate import AccelerateBackend
    from launcher.data import LoaderSettings, eval_loader, train_loader
    from launcher.models.loss import CrossEntropy
    from launcher.optim import build_optimizer
    from launcher.planning.plan import PlanInput, plan_batch
    from launcher.training.loop import fit
    from launcher.training.metrics import MetricsSink
    from launcher.types.bundles import Feed, Settings, Trainee

    cfg = composed(
        [f"global_batch={global_batch}", f"micro_batch={micro}", "optim=sgd", "optim.base_lr=1.0"]
        + [f"optim.ref_batch={global_batch}", "optim.momentum=0", "optim.weight_decay=0"]
        + ["optim.clip_grad_norm=0", "optim.large_batch.enabled=false", "schedule=constant"]
        + ["schedule.warmup_epochs=0", "trainer.epochs=1"]
    )
    backend = AccelerateBackend(cfg, "cpu")
    plan = plan_batch(PlanInput(cfg, 2, global_batch))
    assert plan.steps == 1, plan.steps
    optimizer = build_optimizer(plan.optimizer, cfg.optim, model, plan.lr, plan.weight_decay)
    model, optimizer = backend.prepare(model, optimizer, plan)
    loading = LoaderSettings(workers=workers)
    feed = Feed(
        lambda p, step: train_loader(source, p, rank, 0, step, loading),
        lambda p: eval_loader(source, p, rank),
    )
    sink = MetricsSink(None, total_steps=plan.steps, tensorboard=False, progress=False)
    t = Trainee(model, optimizer, backend, torch.float64, CrossEntropy())
    fit(t, plan, feed, sink, Settings(log_every=1, eval_every_samples=global_batch))
    params = {n: p.detach().clone() for n, p in backend.unwrap(model).named_parameters()}
    teardown()
    return params

"""One launcher run per run folder (launcher/checkpoint/lock.py): flock(2) held by every process of
the run. A second launch is refused in one line naming the holder; a lock file whose holder is gone
(or whose Slurm job or elastic run restarted) is taken over with a line, atomically; a worker keeps
the folder taken after its launcher is killed; the holder removes the file when it exits."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.checkpoint import lock
from launcher.errors import ConfigError
from tests.helpers import PARITY_ARGS, launcher_env, read_metrics, run_cli

PLAN = ["plan_only=true", "memory.probe=false", "run_dir=run"]
HOLD = """
import sys, time
from pathlib import Path
from launcher.checkpoint import lock
lock.acquire(Path(sys.argv[1]))
print(lock.shared(Path(sys.argv[1]))[lock.ENV], flush=True)
time.sleep(600)
"""
JOIN = """
import time
from launcher.checkpoint import lock
lock.join()
print("in", flush=True)
time.sleep(600)
"""


def _lock(tmp_path, **holder) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"since": "earlier", **holder}))


def _holder(folder: Path, env: dict | None = None) -> subprocess.Popen:
    """A process that holds `folder`'s lock until killed; returns once it does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        env=launcher_env() | (env or {}),
        stdout=subprocess.PIPE,
        text=True,
    )
    proc.spec = proc.stdout.readline().strip()  # printed once the lock is held
    assert proc.spec, "the holder did not take the lock"
    return proc


@pytest.mark.slow
def test_a_folder_in_use_is_refused_in_one_line(tmp_path) -> None:
    with _holder(tmp_path / "run") as other:
        try:
            res = run_cli(PLAN, tmp_path)
        finally:
            other.kill()
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(
        f"launcher: error: run_dir={str(tmp_path / 'run')!r}: in use by process {other.pid} on "
        f"{socket.gethostname()} since "
    )
    assert res.stderr.endswith(
        f"({tmp_path / 'run' / '.lock'}); wait for it, or choose another run_dir\n"
    )
    assert res.stderr.count("\n") == 1
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # nothing else written


@pytest.mark.parametrize(
    ("holder", "env", "why"),
    [
        ({"host": socket.gethostname(), "pid": 2**22 + 7}, {}, "no longer holds it"),
        ({"host": socket.gethostname(), "pid": "x"}, {}, "no longer holds it"),  # a bad pid
        ({"host": "node7", "pid": 1, "slurm_job": "4242"}, {"SLURM_JOB_ID": "4242"}, "Slurm job"),
        (
            {"host": "node7", "pid": 1, "elastic_run": "e1"},
            {"TORCHELASTIC_RUN_ID": "e1"},
            "elastic",
        ),
    ],
)
def test_a_stale_lock_is_taken_over_with_a_line(holder, env, why, tmp_path, monkeypatch, capsys):
    for key, value in {"SLURM_JOB_ID": None, "TORCHELASTIC_RUN_ID": None, **env}.items():
        monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
    _lock(tmp_path, **holder)
    lock.acquire(tmp_path / "run")
    try:
        assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release(tmp_path / "run" / ".lock", os.getpid())
    err = capsys.readouterr().err
    assert f"launcher: taking over the lock of {tmp_path / 'run'} from process" in err
    assert why in err and err.count("\n") == 1
    assert not (tmp_path / "run" / ".lock").exists()  # released


@pytest.mark.parametrize("content", [b"", b"\xff\xfe{not json", b"[1, 2]"])
def test_an_empty_or_garbled_lock_file_does_not_block_a_launch(content, tmp_path) -> None:
    """A full disk leaves the lock file empty; the kernel's lock is what counts."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_bytes(content)
    lock.acquire(tmp_path / "run")
    try:
        assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release(tmp_path / "run" / ".lock", os.getpid())
    assert not (tmp_path / "run" / ".lock").exists()


def test_another_hosts_lock_is_not_guessed_at(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _lock(tmp_path, host="node7", pid=1, slurm_job="1")
    for _ in range(2):  # refused each time: the refusal holds nothing of it
        with pytest.raises(ConfigError, match="locked by process 1 on node7 .*delete the lock$"):
            lock.acquire(tmp_path / "run")
    assert json.loads((tmp_path / "run" / ".lock").read_text())["host"] == "node7"  # untouched


def _race(folder: str, start, results) -> None:
    """One contender of test_taking_over_a_stale_lock_is_atomic: acquire, report, hold."""
    start.wait()
    try:
        lock.acquire(Path(folder))
        results.put(os.getpid())
    except ConfigError:
        results.put(None)
    time.sleep(600)  # held until the test kills it: every contender tried while it held


@pytest.mark.slow
def test_taking_over_a_stale_lock_is_atomic(tmp_path) -> None:
    """Contenders started together on a folder whose lock names a dead process: one wins."""
    context = multiprocessing.get_context("fork")
    for trial in range(12):
        folder = tmp_path / f"run{trial}"
        folder.mkdir()
        (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7}))
        start, results = context.Event(), context.Queue()
        procs = [
            context.Process(target=_race, args=(str(folder), start, results)) for _ in range(4)
        ]
        for p in procs:
            p.start()
        start.set()
        try:
            won = [results.get(timeout=60) for _ in procs]
        finally:
            for p in procs:
                p.kill()
                p.join()
        assert sum(w is not None for w in won) == 1, won
        assert json.loads((folder / ".lock").read_text())["pid"] in won


@pytest.mark.slow
def test_a_worker_keeps_the_folder_taken_after_its_launcher_dies(tmp_path, monkeypatch) -> None:
    """The workers of trainer.devices share the lock: kill -9 of the launcher leaves it held
    while a worker lives (a rerun waits LINGER_S, then is refused), and free once none does."""
    monkeypatch.setattr(lock, "LINGER_S", 0.5)
    launcher = _holder(tmp_path / "run")
    worker = subprocess.Popen(
        [sys.executable, "-c", JOIN],
        env=launcher_env() | {lock.ENV: launcher.spec},
        stdout=subprocess.PIPE,
        text=True,
    )
    with launcher, worker:
        assert worker.stdout.readline() == "in\n"
        launcher.kill()
        launcher.wait()
        with pytest.raises(ConfigError, match="its launcher is gone but processes it started"):
            lock.acquire(tmp_path / "run")
        worker.kill()
        worker.wait()
    lock.acquire(tmp_path / "run")  # free now: taken over from the dead launcher
    lock.release(tmp_path / "run" / ".lock", os.getpid())


@pytest.mark.slow
def test_a_worker_whose_launchers_lock_is_gone_stops(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("")
    stale = f"{(tmp_path / 'run' / '.lock').stat().st_ino + 1}:{tmp_path / 'run' / '.lock'}"
    res = subprocess.run(
        [sys.executable, "-c", JOIN], env=launcher_env() | {lock.ENV: stale}, capture_output=True
    )
    assert res.returncode == 1 and b"the launcher's lock is gone" in res.stderr


@pytest.mark.slow
def test_two_launches_on_one_folder(tmp_path, data_cache) -> None:
    """The first run waits at step 1 (a test hook) holding the folder; the second, started on
    the same folder, is refused; SIGTERM lets the first stop with its checkpoint."""
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    cmd = [sys.executable, "-m", "launcher", *args]
    env = launcher_env() | {"LAUNCHER_TEST_KILL": "1:step:WAIT"}
    with subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) as first:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "plan.json").exists():  # a condition, not a duration
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        second = run_cli(args, tmp_path)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr
    assert first.returncode == 3
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.slow
def test_kill_9_of_the_launcher_takes_its_workers_with_it(tmp_path, data_cache) -> None:
    """`kill -9` of `python -m launcher trainer.devices=2` mid-run: no worker outlives it (the
    kernel kills them: PR_SET_PDEATHSIG), and the rerun resumes from the last checkpoint with
    every step logged once."""
    args = [
        *PARITY_ARGS,
        f"data.cache_dir={data_cache}",
        "trainer.devices=2",
        "trainer.log_every=1",
        "checkpoint.every_samples=64",
        "run_dir=run",
    ]
    cmd = [sys.executable, "-m", "launcher", *args]
    env = launcher_env() | {"LAUNCHER_TEST_KILL": "3:step:WAIT"}  # the workers wait at step 3
    with subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) as agent:
        deadline = time.monotonic() + 300
        while not any(m.get("step") == 3 for m in _metrics(tmp_path / "run")):
            assert agent.poll() is None and time.monotonic() < deadline, agent.stderr.read()
            time.sleep(0.05)
        workers = psutil.Process(agent.pid).children(recursive=True)
        assert len([w for w in workers if "launcher" in " ".join(w.cmdline())]) >= 2
        agent.kill()
        agent.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert alive == [], f"workers outlived their launcher: {alive}"
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 5, steps


def _metrics(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):
        return []

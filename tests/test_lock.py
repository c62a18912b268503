"""One launcher process per run folder (launcher/checkpoint/lock.py): a second one is refused in one
line naming the holder; a lock whose process is gone (or whose Slurm job was requeued) is taken over
with a line; the holder removes it when it exits."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import PARITY_ARGS, launcher_env, run_cli

PLAN = ["plan_only=true", "memory.probe=false", "run_dir=run"]


def _lock(tmp_path, **holder) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"since": "earlier", **holder}))


def test_a_folder_in_use_is_refused_in_one_line(tmp_path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as other:
        try:
            _lock(tmp_path, host=socket.gethostname(), pid=other.pid, slurm_job=None)
            res = run_cli(PLAN, tmp_path)
        finally:
            other.kill()
    assert res.returncode == 2, res.stderr
    assert res.stderr == (
        f"launcher: error: run_dir={str(tmp_path / 'run')!r}: in use by process {other.pid} on "
        f"{socket.gethostname()} since earlier ({tmp_path / 'run' / '.lock'}); wait for it, "
        "choose another run_dir, or delete the lock if that process is gone\n"
    )
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # nothing else written


@pytest.mark.parametrize(
    ("holder", "why"),
    [
        ({"host": socket.gethostname(), "pid": 2**22 + 7, "slurm_job": None}, "no longer runs"),
        ({"host": "node7", "pid": 1, "slurm_job": "4242"}, "Slurm job 4242 was requeued"),
    ],
)
def test_a_stale_lock_is_taken_over_with_a_line(holder, why, tmp_path) -> None:
    _lock(tmp_path, **holder)
    res = run_cli(PLAN, tmp_path, env={"SLURM_JOB_ID": "4242"})
    assert res.returncode == 0, res.stderr
    assert f"launcher: taking over the lock of {tmp_path / 'run'} from process" in res.stderr
    assert why in res.stderr
    assert not (tmp_path / "run" / ".lock").exists()  # released at exit
    assert (tmp_path / "run" / "plan.json").exists()


def test_another_hosts_lock_is_not_guessed_at(tmp_path) -> None:
    _lock(tmp_path, host="node7", pid=1, slurm_job="1")
    res = run_cli(PLAN, tmp_path)
    assert res.returncode == 2 and "in use by process 1 on node7" in res.stderr


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

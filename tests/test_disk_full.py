"""A file system that fills up during a run (a real tmpfs, filled by a test hook at a known
step): one line naming the file and what was being written, exit 5, no temporary file left, the
previous checkpoint intact. Needs root to mount (CI has it; skipped with the reason otherwise)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from launcher.checkpoint import files as checkpoint
from tests.helpers import PARITY_ARGS, run_cli, skip_or_fail


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs of its own."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        skip_or_fail(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _run(disk, tmp_path, data_cache, extra: list[str]):
    args = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32"]
    args += [f"run_dir={disk / 'run'}", "checkpoint.keep=5", *extra]
    env = {"LAUNCHER_TEST_KILL": "2:step:FILL", "LAUNCHER_TEST_FILL": str(disk / "filler")}
    return run_cli(args, tmp_path, env=env)


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_is_one_line_and_keeps_the_last(disk, tmp_path, data_cache):
    res = _run(disk, tmp_path, data_cache, ["checkpoint.every_samples=64"])
    assert res.returncode == 5, res.stderr[-3000:]
    run = disk / "run"
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("launcher: error:")]
    assert line == (
        f"launcher: error: cannot write checkpoint {run}/checkpoints/step-000000002.pt (No space "
        f"left on device); the previous one, {run}/checkpoints/step-000000001.pt, is intact"
    )
    assert "Traceback" not in res.stderr
    assert not list(run.rglob("*.tmp"))
    (disk / "filler").unlink()  # room again: the previous checkpoint loads, digest-checked
    state, path = checkpoint.load(run, pytest.fail)
    assert state["step"] == 1 and path.name == "step-000000001.pt"


@pytest.mark.slow
def test_metrics_that_do_not_fit_are_one_line(disk, tmp_path, data_cache) -> None:
    """25 steps, a line each: more than the page the file already has (tmpfs pages are 4 KiB)."""
    res = _run(disk, tmp_path, data_cache, ["trainer.epochs=1"])
    assert res.returncode == 5, res.stderr[-3000:]
    assert (
        f"launcher: error: cannot write metrics {disk / 'run' / 'metrics.jsonl'} (No space left "
        "on device)" in res.stderr
    )
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_tensorboard_that_does_not_fit_is_one_line(disk, tmp_path, data_cache) -> None:
    """The events file is written by TensorBoard's own thread; its error surfaces as one line."""
    res = _run(disk, tmp_path, data_cache, ["trainer.tensorboard=true", "trainer.epochs=1"])
    assert res.returncode == 5, res.stderr[-3000:]
    assert "launcher: error: cannot write " in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_run_dir_on_a_read_only_mount_is_refused_before_anything(disk, tmp_path) -> None:
    """The issue's read-only mount: found by the folder check (launcher/checkpoint/paths.py), one
    line."""
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    res = run_cli(["plan_only=true", f"run_dir={disk / 'run'}"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr == (
        f"launcher: error: run_dir={str(disk / 'run')!r}: cannot write there (Read-only file "
        "system)\n"
    )


@pytest.mark.slow
def test_shards_that_do_not_fit_are_one_line_and_keep_the_last(disk, tmp_path, data_cache):
    """backend=fsdp on 2 ranks: the shard folder of step 2 does not fit; every rank stops (no
    hang), one line, exit 5, no partial folder, the sharded checkpoint of step 1 loads."""
    res = _run(
        disk,
        tmp_path,
        data_cache,
        ["checkpoint.every_samples=64", "backend=fsdp"] + ["micro_batch=16", "trainer.devices=2"],
    )
    assert res.returncode == 5, res.stderr[-3000:]
    run = disk / "run"
    lines = [x for x in res.stderr.splitlines() if x.startswith("launcher: error: cannot write")]
    assert lines and lines[0] == (
        f"launcher: error: cannot write checkpoint shards {run}/checkpoints/"
        "step-000000002.dcp.tmp (No space left on device); the previous one, "
        f"{run}/checkpoints/step-000000001.pt, is intact"
    )
    assert "Traceback" not in res.stderr
    assert not list(run.rglob("*.tmp")) and not (run / "checkpoints/step-000000002.dcp").exists()
    (disk / "filler").unlink()
    state, path = checkpoint.load(run, pytest.fail)
    assert state["step"] == 1 and "shards" in state and checkpoint.shards_of(path).is_dir()


def test_a_full_disk_inside_torch_save_is_one_line_with_nothing_left(disk) -> None:
    """A state larger than the space left: torch's zip writer fails mid-write (its RuntimeError
    hides the OSError), for a checkpoint and for the final weights alike."""
    from launcher.checkpoint.paths import WriteFailed
    from launcher.training.phases import _save_final

    big = {"consumed_samples": 1, "model": {"w": torch.zeros(8_000_000)}}  # 32 MB on 16 MiB
    (disk / "run").mkdir()
    with pytest.raises(WriteFailed) as raised:
        checkpoint.save(disk / "run", 3, big, keep=2)
    assert raised.value.line() == (
        f"launcher: error: cannot write checkpoint {disk}/run/checkpoints/step-000000003.pt "
        "(No space left on device); none saved before"
    )
    assert list((disk / "run" / "checkpoints").iterdir()) == []
    with pytest.raises(WriteFailed, match="cannot write the final weights .*No space left"):
        _save_final(big["model"], disk / "model_final.pt")
    assert not (disk / "model_final.pt").exists()

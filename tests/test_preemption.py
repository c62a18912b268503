"""Stopping on SIGUSR1 / SIGTERM at a step boundary with a checkpoint, and resuming from it.

Stated tolerance: float64, 1e-10 absolute on the final parameters against one uninterrupted
process (PARITY_ARGS, 5 steps of 64 samples). The signals are real: the test hook sends them to
the process itself at a known step (LAUNCHER_TEST_KILL, faults.py), or the test sends them from
outside while the workers wait at that step. The Slurm requeue path is in test_slurm.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from launcher.checkpoint import files as checkpoint
from tests.helpers import PARITY_ARGS, final_state, launcher_env, read_metrics, run_cli

pytestmark = pytest.mark.slow  # each test signals a real launcher process

TOL = 1e-10


def _same(got: dict, ref: dict) -> None:
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=TOL, rtol=0, msg=name)


def _steps_and_events(run_dir) -> tuple[list[int], list[tuple]]:
    metrics = read_metrics(run_dir)
    steps = [m["step"] for m in metrics if "loss" in m]
    events = [(m["event"], m["step"]) for m in metrics if "event" in m]
    return steps, events


def test_signals_stop_after_a_checkpoint_and_the_rerun_matches(
    one_rank_reference, tmp_path, data_cache
):
    """SIGUSR1 after step 3 and a SIGTERM while that checkpoint is being written: the save
    completes, the run stops with exit 3 and one line, and the rerun ends bit-identical."""
    cmd = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    env = {"LAUNCHER_TEST_KILL": "3:step:USR1,3:written:TERM"}
    res = run_cli(cmd, tmp_path, env=env)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "launcher: stopped by SIGUSR1 and SIGTERM after step 3 of 5; checkpoint "
        f"{tmp_path}/run/checkpoints/step-000000003.pt; rerun the same command (resume=auto) to "
        "continue"
    )
    state, path = checkpoint.load(tmp_path / "run", print)  # digest-checked, `latest` points to it
    assert path.name == "step-000000003.pt" and state["consumed_samples"] == 3 * 64
    assert not (tmp_path / "run" / "model_final.pt").exists()

    res = run_cli(cmd, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    steps, events = _steps_and_events(tmp_path / "run")
    assert steps == [1, 2, 3, 4, 5]  # each step once
    assert events == [("checkpoint", 3), ("stopped", 3), ("resumed", 3), ("checkpoint", 5)]
    _same(final_state(tmp_path / "run"), one_rank_reference)


@pytest.mark.parametrize("sig", ["USR1", "USR2"])  # USR2: what submitit_slurm asks Slurm for
def test_sigusr_outside_a_working_slurm_says_the_requeue_failed(sig, tmp_path, data_cache):
    cmd = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    env = {"LAUNCHER_TEST_KILL": f"2:step:{sig}", "SLURM_JOB_ID": "987654", "PATH": "/nonexistent"}
    res = run_cli(cmd, tmp_path, env=env)
    assert res.returncode == 3, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(  # the run folder as Hydra gives it: absolute
        f"launcher: stopped by SIG{sig} after step 2 of 5; checkpoint {tmp_path}/run/checkpoints/"
        "step-000000002.pt; scontrol requeue 987654 failed ("
    ), last
    assert last.endswith("resubmit the job to continue")


def _signal_the_agent_at_step_3(cmd: list[str], cwd, sig: signal.Signals) -> tuple[int, str]:
    """`python -m launcher CMD` whose workers wait at step 3 (a test hook) until `sig`, sent to
    the agent once step 3 is logged; (its exit code, its stderr)."""
    env = launcher_env() | {"LAUNCHER_TEST_KILL": "3:step:WAIT"}
    out = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agent = subprocess.Popen([sys.executable, "-m", "launcher", *cmd], cwd=cwd, env=env, **out)
    try:
        deadline = time.monotonic() + 300  # a condition to wait for, not a timing
        metrics = cwd / "run" / "metrics.jsonl"
        while '"step": 3' not in (metrics.read_text() if metrics.exists() else ""):
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()
            time.sleep(0.1)
        agent.send_signal(sig)
        _, err = agent.communicate(timeout=300)
    finally:
        agent.kill()
    return agent.returncode, err


def test_sigusr1_to_the_trainer_devices_agent_reaches_the_workers(
    one_rank_reference, tmp_path, data_cache
):
    """`python -m launcher trainer.devices=2` passes SIGUSR1 on to its two workers (waiting at
    step 3 for a signal): both stop after the same step, and the rerun matches one process."""
    cmd = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16", "run_dir=run"]
    cmd.append("trainer.devices=2")
    code, err = _signal_the_agent_at_step_3(cmd, tmp_path, signal.SIGUSR1)
    assert code == 3, err[-3000:]
    assert "launcher: stopped by SIGUSR1 after step 3 of 5; checkpoint" in err
    assert "launcher: error" not in err  # a stop on request is not an error
    res = run_cli(cmd, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    steps, events = _steps_and_events(tmp_path / "run")
    assert steps == [1, 2, 3, 4, 5]
    assert events == [("checkpoint", 3), ("stopped", 3), ("resumed", 3), ("checkpoint", 5)]
    _same(final_state(tmp_path / "run"), one_rank_reference)


@pytest.mark.parametrize(
    ("kill", "names"),
    [
        ("2:step:INT", "SIGINT"),  # Ctrl-C: the same graceful stop as SIGTERM
        ("2:step:TERM,2:stopping:TERM,0:exit:TERM", "SIGTERM"),  # more while it stops: still 3
    ],
)
def test_ctrl_c_and_a_second_sigterm_stop_with_a_checkpoint(kill, names, tmp_path, data_cache):
    cmd = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    res = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": kill})
    assert res.returncode == 3, (res.returncode, res.stderr[-3000:])
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"launcher: stopped by {names} after step 2 of 5; checkpoint "), last
    assert last.endswith("rerun the same command (resume=auto) to continue")


@pytest.mark.parametrize(
    ("kill", "tail"),
    [
        ("0:preparing:TERM", "rerun the same command to start"),
        ("0:preparing:INT", "rerun the same command to start"),
        ("0:preparing:USR1", "not under Slurm: rerun the same command (resume=auto) to continue"),
    ],
)
def test_a_signal_before_training_stops_at_once(kill, tail, tmp_path, data_cache):
    """While the data is prepared (61 s at 300k MNIST-1D samples) a signal stops the run where
    it is, not after the first step: exit 3, one line, nothing written."""
    cmd = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    res = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": kill})
    assert res.returncode == 3, res.stderr[-3000:]
    name = "SIG" + kill.rsplit(":", 1)[1]
    assert res.stderr.strip().splitlines()[-1] == (
        f"launcher: stopped by {name} before training started: nothing to save; {tail}"
    )
    assert "Traceback" not in res.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_signal_in_the_last_moments_of_a_stopped_run_changes_nothing(tmp_path, data_cache):
    """SIGTERM after the run stopped and its exit handlers ran: still exit 3 (Python's
    finalization, which would restore the default handlers, is not entered)."""
    cmd = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=32", "run_dir=run"]
    res = run_cli(cmd, tmp_path, env={"LAUNCHER_TEST_KILL": "2:step:TERM,0:exited:TERM"})
    assert res.returncode == 3, (res.returncode, res.stderr[-3000:])


def test_ctrl_c_to_the_trainer_devices_agent_stops_with_exit_3(tmp_path, data_cache):
    """Ctrl-C (SIGINT) to `python -m launcher trainer.devices=2`: the workers stop after the
    same step with a checkpoint, and the launcher exits 3 as one process would (it was 130)."""
    cmd = [*PARITY_ARGS, f"data.cache_dir={data_cache}", "micro_batch=16", "run_dir=run"]
    code, err = _signal_the_agent_at_step_3([*cmd, "trainer.devices=2"], tmp_path, signal.SIGINT)
    assert code == 3, err[-3000:]
    assert "launcher: stopped by SIGINT after step 3 of 5; checkpoint" in err

"""Stop at a step boundary when the job is asked to, with a checkpoint, and requeue under Slurm.

SIGUSR1 is what the slurm/ templates ask Slurm to send before the time limit (`--signal`): the run
saves a checkpoint at the next step boundary, rank 0 runs `scontrol requeue`, and the requeued job
resumes from it (resume=auto, same run_dir). SIGUSR2, which hydra/launcher=submitit_slurm asks for,
does the same (in place of submitit's own handler, which would requeue at once, without a
checkpoint of the step in progress); the requeued job runs the same sweep job again and resumes.
SIGTERM (scancel, a preempting scheduler, `kill`) and SIGINT (Ctrl-C) save and stop without
requeueing, so a cancelled job stays cancelled. The handlers only record the signal, and stay until
the process exits once one came: a second one during the save or the exit changes nothing. All
ranks decide together at the step boundary (job.py gathers the flags), so they stop after the same
step.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from launcher.errors import LauncherError

REQUEUE, STOP = signal.SIGUSR1, signal.SIGTERM
# bit 1 belongs to the checkpoint clock (job.py); SIGINT (Ctrl-C) stops as SIGTERM does
BITS = {REQUEUE: 2, STOP: 4, signal.SIGUSR2: 8, signal.SIGINT: 16}
STOPS = (STOP, signal.SIGINT)  # save and stop, no requeue
EXIT_CODE = 3
_received: set[int] = set()


class Stopped(LauncherError):
    """Training stopped early on a signal, after the checkpoint (if any) was written."""

    exit_code = EXIT_CODE
    prefix = ""  # not an error: the run continues from its checkpoint


_at_once = False  # before training: a signal stops the job where it is (nothing to save yet)


def _record(signum: int, frame: object) -> None:
    _received.add(signum)
    if _at_once:
        _stop_now(signal.Signals(signum))


def _stop_now(sig: signal.Signals) -> None:
    """A signal before the first step (data preparation, the memory probe, start-up): stop
    here, at once, with nothing to save; a requeue signal requeues the Slurm job (rank 0)."""
    global _at_once
    _at_once = False  # once: the stop below runs with signals only recorded
    head = f"launcher: stopped by {sig.name} before training started: nothing to save"
    if sig in STOPS or os.environ.get("RANK", "0") != "0":
        raise Stopped(f"{head}; rerun the same command to start")
    raise Stopped(f"{head}; {requeue()}")


@contextmanager
def handled() -> Iterator[None]:
    """Record SIGUSR1, SIGUSR2, SIGTERM and SIGINT instead of dying, for the duration of a job.
    Until training starts (`training`) a signal stops the job at once (Stopped); from then on
    it is acted on at the next step boundary. A job that stops on one keeps recording them until
    the process exits, so a second signal while it saves, says its line or tears down changes
    nothing (exit 3, not 143; cli.py exits without Python's finalization, which would restore
    the default handlers)."""
    global _at_once
    _received.clear()
    previous = {sig: signal.signal(sig, _record) for sig in BITS}
    _at_once = True
    try:
        yield
    finally:
        _at_once = False
        if not _received:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def training() -> None:
    """The first step is about to run: from now on a signal is acted on at a step boundary,
    with a checkpoint. One that came already stops the job here."""
    global _at_once
    _at_once = False
    if _received:
        _stop_now(signal.Signals(min(_received)))


def received() -> int:
    """The signals seen so far, as bits for the flag gather."""
    return sum(bit for sig, bit in BITS.items() if sig in _received)


def signals(bits: int) -> list[signal.Signals]:
    return [sig for sig, bit in BITS.items() if bits & bit]


def requeue(env: Mapping[str, str] | None = None) -> str:
    """`scontrol requeue` this Slurm job; returns what happened, for the stop message."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if job is None:
        return "not under Slurm: rerun the same command (resume=auto) to continue"
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol requeue {job} failed ({exc}); resubmit the job to continue"
    if done.returncode:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return f"scontrol requeue {job} failed ({why[0]}); resubmit the job to continue"
    return f"Slurm job {job} requeued: it resumes from this checkpoint"

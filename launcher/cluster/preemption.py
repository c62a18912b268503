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


def _record(signum: int, frame: object) -> None:
    _received.add(signum)


@contextmanager
def handled() -> Iterator[None]:
    """Record SIGUSR1, SIGUSR2, SIGTERM and SIGINT instead of dying, for the duration of a job.
    A job that stops on one keeps recording them until the process exits, so a second signal
    while it saves, says its line or tears down changes nothing (exit 3, not 143)."""
    _received.clear()
    previous = {sig: signal.signal(sig, _record) for sig in BITS}
    try:
        yield
    finally:
        if not _received:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


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

"""Fault injection for tests, inert unless LAUNCHER_TEST_KILL is set.

LAUNCHER_TEST_KILL=STEP:PHASE[:ACTION][,...] acts at optimizer step STEP, PHASE `step` (after the
step), `written` (checkpoint written under its temporary name), `renamed` (in place, `latest` not
yet updated), `stopping` (a signal's checkpoint saved, the run about to stop) or, at STEP 0, `exit`
(the run stopped, the process exiting). ACTION: KILL (default; SIGKILL, as `kill -9` would), USR1,
USR2, TERM or INT (sends that signal to this process), FILL (fills the file system of the file
LAUNCHER_TEST_FILL names), WAIT (blocks until SIGUSR1 or SIGTERM arrives, at most 10 minutes, so a
test can deliver it from outside at a known step).
"""

from __future__ import annotations

import os
import signal
import time


def test_kill(step: int, phase: str) -> None:
    spec = os.environ.get("LAUNCHER_TEST_KILL")
    if not spec:
        return
    for item in spec.split(","):
        at_step, at_phase, action = (item.split(":") + ["KILL"])[:3]
        if (at_step, at_phase) != (str(step), phase):
            continue
        if action == "WAIT":
            from launcher.cluster import preemption

            deadline = time.monotonic() + 600
            while not preemption.received() and time.monotonic() < deadline:
                time.sleep(0.05)
        elif action == "FILL":
            _fill(os.environ["LAUNCHER_TEST_FILL"])
        else:
            os.kill(os.getpid(), getattr(signal, f"SIG{action}"))


def _fill(path: str) -> None:
    """Write `path` until its file system is full (a real ENOSPC for what comes next)."""
    block = b"\0" * (1 << 16)
    with open(path, "ab") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    while True:  # the last partial blocks too
        try:
            with open(path, "ab") as f:
                f.write(b"\0")
        except OSError:
            return

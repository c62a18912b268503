"""Fault injection for tests, inert unless LAUNCHER_TEST_KILL is set.

LAUNCHER_TEST_KILL=STEP:PHASE[:ACTION][,...] acts at optimizer step STEP, PHASE `step` (after the
step), `written` (checkpoint written under its temporary name), `renamed` (in place, `latest` not
yet updated) `stopping` (a signal's checkpoint saved, the run about to stop) or, at STEP 0, `exit`
(the run stopped, the process exiting). ACTION: KILL (default; SIGKILL, as `kill -9` would), USR1,
USR2, TERM or INT (sends that signal to this process), WAIT (blocks until SIGUSR1 or SIGTERM
arrives, at most 10 minutes, so a test can deliver it from outside at a known step).
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
            from launcher import preemption

            deadline = time.monotonic() + 600
            while not preemption.received() and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            os.kill(os.getpid(), getattr(signal, f"SIG{action}"))

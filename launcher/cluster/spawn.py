"""`trainer.devices=N` on a plain `python -m launcher`: start N workers on this machine with
PyTorch's elastic launcher (the machinery behind `torchrun --standalone`), each running the same
command line; they find WORLD_SIZE etc. in their environment and train as under torchrun.

This process is the agent: SIGTERM, SIGINT and SIGUSR1 are passed on to the workers (which
checkpoint at the next step boundary, preemption.py) and it waits for them; the exit code is the
first failing worker's (2 bad input, 3 stopped on a signal, 4 diverged, 5 a write failed), or 1.
Workers die with the agent: torch starts them in sessions of their own, so a `kill -9` of the
agent (or of its process group) would leave them training; each asks the kernel at start to kill
it when its parent dies (die_with_parent), and shares the run folder's lock (checkpoint/lock.py),
so a rerun is refused until the last of them is gone.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import uuid
from typing import Any

from launcher.cluster.preemption import EXIT_CODE
from launcher.errors import LauncherError

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# the launcher's own exit codes, each with the one line the worker printed: 2 bad input,
# 3 stopped on a signal, 4 diverged, 5 a file could not be written (launcher/errors.py)
SAID = (2, EXIT_CODE, 4, 5)
SHUTDOWN_TIMEOUT_S = 600  # a worker asked to stop finishes its step and writes a checkpoint
AGENT = "LAUNCHER_AGENT_PID"  # the trainer.devices agent's PID, in its workers' environment
PR_SET_PDEATHSIG = 1  # prctl(2)


class WorkersFailed(LauncherError):
    """A trainer.devices worker failed: its exit code, and its one line if it said one."""

    def __init__(self, code: int, message: str | None) -> None:
        super().__init__(message or "")
        self.code = self.exit_code = code
        self.message = message

    def line(self) -> str:
        return f"{self.prefix}{self.message}" if self.message else ""

    def __reduce__(self) -> tuple[type[WorkersFailed], tuple[int, str | None]]:
        # back from a Hydra launcher plugin's process, pickled
        return WorkersFailed, (self.code, self.message)


def die_with_parent() -> None:
    """In a worker of torch's elastic agent (trainer.devices, torchrun, accelerate launch): the
    kernel sends SIGKILL to this process when the agent that started it dies, however it dies;
    an agent already gone by now (it died while this process started) ends it at once."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    agent = os.environ.get(AGENT) if "LAUNCHER_SPAWNED" in os.environ else None
    # trainer.devices: the agent is known; torchrun, accelerate launch: adopted by init
    orphaned = (os.getppid() != int(agent)) if agent else (os.getppid() == 1)
    if orphaned:
        os.kill(os.getpid(), signal.SIGKILL)


def spawn(processes: int, args: list[str], env: dict[str, str] | None = None) -> None:
    """Run `python -m launcher ARGS` as `processes` local workers; WorkersFailed if one fails."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    options = {f.name for f in dataclasses.fields(LaunchConfig)}
    extra: dict[str, Any] = {}  # what this torch's LaunchConfig takes of these
    if "signals_to_handle" in options:
        extra["signals_to_handle"] = SIGNALS
    if "shutdown_timeout" in options:
        extra["shutdown_timeout"] = SHUTDOWN_TIMEOUT_S
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # as torchrun --standalone: a free port on this machine
        max_restarts=0,
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(),
        **extra,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does for several workers
    os.environ["LAUNCHER_SPAWNED"] = "1"
    scoped = {AGENT: str(os.getpid()), **(env or {})}  # env: the run folder's lock, to share
    kept = {key: os.environ.get(key) for key in scoped}
    os.environ.update(scoped)  # the workers' environment is this process's
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # an older torch cannot pass it on
    try:
        elastic_launch(config, sys.executable)("-m", "launcher", *args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode in SAID:  # the worker printed its one line already
            raise WorkersFailed(failure.exitcode, None) from None
        raise WorkersFailed(
            1, f"worker rank {rank} exited with code {failure.exitcode} (its output is above)"
        ) from None
    except SignalException as exc:  # passed on to the workers, which stopped after a step
        if exc.sigval in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            raise WorkersFailed(EXIT_CODE, None) from None  # rank 0 said where it stopped
        raise WorkersFailed(128 + exc.sigval, f"{exc.sigval.name}: workers stopped") from None
    finally:
        signal.signal(signal.SIGUSR1, previous)
        for key, value in kept.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

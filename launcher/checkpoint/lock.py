"""One launcher process per run folder: `RUN/.lock`, made with O_EXCL (atomic on local file
systems and on NFS v3+), holding the host, PID, Slurm job and start time of its holder.

A second process on the folder is refused in one line naming the holder. A lock left by a process
that no longer runs is taken over with a line: on this host when its PID is gone, on any host
when it belongs to this Slurm job (a requeued job, maybe on another node). A lock from another
host whose process cannot be checked from here is refused with the way out (delete it). The
holder removes it when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from launcher import log
from launcher.errors import ConfigError

NAME = ".lock"


def _mine() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def _stale(holder: dict, me: dict) -> str | None:
    """Why the holder's lock can be taken over, or None when it may still be in use."""
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return f"Slurm job {holder['slurm_job']} was requeued"
    if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", 0))):
        return "that process no longer runs"
    return None


def acquire(folder: Path) -> None:
    """Hold `folder`'s lock until this process exits (the folder is made if missing); refuse in
    one line when another process holds it."""
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / NAME
    me = _mine()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):  # being written, or not ours: look again
                time.sleep(0.1)
                continue
            if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                return  # this process holds it already (a sweep's next job)
            why = _stale(holder, me)
            if why is None:
                raise ConfigError(
                    f"run_dir={str(folder)!r}: in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('since')} ({path}); wait for it, "
                    "choose another run_dir, or delete the lock if that process is gone"
                ) from None
            log.warn(
                f"launcher: taking over the lock of {folder} from process {holder.get('pid')} on "
                f"{holder.get('host')} ({why})"
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release, path, me["pid"])
        return
    raise ConfigError(f"run_dir={str(folder)!r}: cannot take its lock {path}; try again")


def release(path: Path, pid: int) -> None:
    """Remove the lock if this process holds it."""
    try:
        if json.loads(path.read_text()).get("pid") == pid and os.getpid() == pid:
            path.unlink()
    except (OSError, ValueError):
        pass

"""One launcher run per run folder: `RUN/.lock`, held with flock(2) by every process of the run.

The kernel's lock says whether a run is alive: the launcher holds it, and so does every process
its run started (trainer.devices workers take it shared, data-loader processes inherit it), so a
folder is free only once the last process of the old run is gone, and a lock is never left
behind by a crash or `kill -9`. Taking it is one atomic call: two launchers can never both win.
The file holds who has it (host, PID, Slurm job, elastic run, start time), for the messages and
for what the kernel cannot see: on a shared file system whose locks do not reach across hosts,
a lock written on another host is refused with the way out (delete it), unless it belongs to
this Slurm job or torchrun elastic run (requeued or restarted, maybe on another node). The holder
removes the file when it exits.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from launcher import log
from launcher.errors import ConfigError

NAME = ".lock"
ENV = "LAUNCHER_LOCK"  # "<inode>:<path>" of the lock a trainer.devices worker shares
LINGER_S = 30.0  # how long a launch waits for the processes of a dead launcher to exit
_held: dict[Path, int] = {}  # lock path -> the descriptor this process holds it with
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_unlockable: set[Path] = set()  # lock files whose file system has no locks (said once)


def _mine() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "elastic_run": os.environ.get("TORCHELASTIC_RUN_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _holder(fd: int) -> dict[str, object]:
    """What the lock file says of its holder ({} when empty or unreadable: a writer that died
    or a full disk). Read through `fd`: on NFS, closing any other descriptor of the file would
    drop this process's lock."""
    try:
        found = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError) as exc:  # someone else's process: it runs
        return isinstance(exc, PermissionError)
    return True


def _who(holder: dict[str, object]) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def _open(path: Path) -> int:
    """The lock file, opened read-write (made if missing); never through a symlink."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"run_dir={str(path.parent)!r}: cannot open its lock {path} ({exc})"
        ) from None


def _try(fd: int, path: Path, how: int) -> bool:
    """flock `fd` without waiting; False when another process holds it. A file system without
    locks is said once, and the run goes on unlocked."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in UNSUPPORTED:
            raise
        if path not in _unlockable:
            _unlockable.add(path)
            log.warn(
                f"launcher: the file system of {path.parent} has no file locks ({exc.strerror}):"
                " nothing keeps a second launch out of this run folder"
            )
    return True


def _same_file(fd: int, path: Path) -> bool:
    """`path` still names the file `fd` locked (a holder that exited unlinks it)."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def acquire(folder: Path) -> None:
    """Hold `folder`'s lock until this process exits (the folder is made if missing); refuse in
    one line while any process of another run holds it."""
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / NAME
    if path in _held:
        return  # this process holds it already (a sweep's next job)
    deadline, said = time.monotonic() + LINGER_S, False
    while True:
        fd = _open(path)
        if _try(fd, path, fcntl.LOCK_EX):
            if _same_file(fd, path):
                break
            os.close(fd)  # locked a file its holder removed meanwhile: look again
            continue
        holder = _holder(fd)
        os.close(fd)
        gone = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
        if not gone or time.monotonic() > deadline:
            what = "; its launcher is gone but processes it started still run" if gone else ""
            raise ConfigError(
                f"run_dir={str(folder)!r}: in use by {_who(holder)} ({path}){what}; wait for "
                "it, or choose another run_dir"
            )
        if not said:
            log.warn(
                f"launcher: the launcher of {folder} ({_who(holder)}) is gone; waiting up to "
                f"{LINGER_S:.0f} s for the processes it started to exit"
            )
            said = True
        time.sleep(0.1)
    _take(fd, path, folder)


def _take(fd: int, path: Path, folder: Path) -> None:
    """Holding the lock exclusively: check what the file says of an earlier holder, write this
    process in, and keep the lock shared (the run's workers join it)."""
    holder, me = _holder(fd), _mine()
    why = _stale(holder, me)
    if why is None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise ConfigError(
            f"run_dir={str(folder)!r}: locked by {_who(holder)} ({path}), another host whose "
            "process cannot be checked from here; if it is gone, delete the lock"
        )
    if holder:
        log.warn(f"launcher: taking over the lock of {folder} from {_who(holder)} ({why})")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError:  # a full disk: the kernel's lock is what counts; the file says nothing
        os.ftruncate(fd, 0)
    if not _try(fd, path, fcntl.LOCK_SH):  # not atomic: another launch took it in between
        os.close(fd)
        raise ConfigError(f"run_dir={str(folder)!r}: in use by another process ({path})")
    _held[path] = fd
    atexit.register(release, path, os.getpid())


def _stale(holder: dict[str, object], me: dict[str, object]) -> str | None:
    """Why an earlier holder's lock, free in the kernel, can be taken over; None when it belongs
    to another host whose lock this file system may not show."""
    if not holder:
        return "the lock file was empty or unreadable"
    for key, what in (("slurm_job", "Slurm job"), ("elastic_run", "elastic run")):
        if holder.get(key) and holder.get(key) == me[key]:
            return f"{what} {holder[key]} restarted"
    if holder.get("host") == me["host"]:
        return "that process no longer holds it"
    return None


def join() -> None:
    """A trainer.devices worker: share its launcher's lock (ENV), so the folder stays taken while
    this process lives, even if the launcher is killed."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    inode, _, where = spec.partition(":")
    path = Path(where)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not _try(fd, path, fcntl.LOCK_SH) or os.fstat(fd).st_ino != int(inode):
        raise ConfigError(f"run_dir={str(path.parent)!r}: the launcher's lock is gone")
    _held[path] = fd


def shared(folder: Path) -> dict[str, str]:
    """The environment that lets trainer.devices workers join this process's lock of `folder`."""
    path = folder.absolute() / NAME
    fd = _held.get(path)
    return {} if fd is None else {ENV: f"{os.fstat(fd).st_ino}:{path}"}


def release(path: Path, pid: int) -> None:
    """Remove the lock if this process holds it (and `path` still names it)."""
    fd = _held.pop(path.absolute(), None)
    if fd is None or os.getpid() != pid:
        return
    if _same_file(fd, path):
        path.unlink(missing_ok=True)
    os.close(fd)

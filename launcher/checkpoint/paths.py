"""Folders a run will write, checked before anything is written; and what a write that fails
later (a disk that fills up) becomes: WriteFailed, one line, exit 5.

`check_writable` makes the folder (and any missing parents) and a temporary file in it, then
removes what it made: a folder that cannot be made (`/proc/x`, a read-only mount, a name over the
file system's limit, a file in the way) or written is one line of bad input, with nothing left
behind. Rank 0 checks (job.validate), so ranks sharing a file system do not race.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from launcher.errors import ConfigError, LauncherError


def check_writable(path: str | os.PathLike[str], key: str) -> None:
    raw = os.fspath(path)
    if not raw.strip():
        raise ConfigError(f"{key}={raw!r}: empty; give a folder (or leave the key out)")
    folder = Path(os.path.expanduser(raw)).absolute()
    missing, probe, made = [], folder, []
    try:
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"{key}={raw!r}: {str(probe)!r} is a file, not a folder")
        for part in reversed(missing):
            part.mkdir()
            made.append(part)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"{key}={raw!r}: cannot write there ({why})") from None
    finally:
        for part in reversed(made):
            try:
                part.rmdir()
            except OSError:
                break


class WriteFailed(LauncherError):
    """A file of the run could not be written (disk full, a mount gone read-only): one line
    naming it and what was being written; exit 5."""

    exit_code = 5
    prefix = ""  # the message is the whole line

    def __init__(self, what: str, path: os.PathLike[str] | str, exc: OSError, after: str = ""):
        why = exc.strerror or type(exc).__name__
        super().__init__(f"launcher: error: cannot write {what} {path} ({why}){after}")

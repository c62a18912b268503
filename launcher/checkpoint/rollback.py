"""A launch's hold on its run folder: the folder's lock while Hydra runs its jobs (lock.py), and,
when the launch is refused as bad input, what it wrote there undone, so nothing is left written.

Hydra writes its records (.hydra/*.yaml, launcher.log, a sweep's multirun.yaml) before a job's
checks can refuse it. Taken before the launch (`before`), `undo` puts back the records a resumed
run had there, removes the others and the folders made for the launch, if they are empty.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from launcher.checkpoint.lock import NAME, acquire, release

RECORDS = (".hydra/*.yaml", "launcher.log", "multirun.yaml", "*/.hydra/*.yaml", "*/launcher.log")


@dataclass(frozen=True)
class Before:
    """A run folder as it was before a launch."""

    folder: Path
    new: list[Path]  # the folder and its parents that did not exist yet, deepest first
    kept: dict[Path, bytes]  # Hydra's records already there (a run resumed there)


def new_dirs(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    new, path = [], folder.absolute()
    while not path.exists():
        new.append(path)
        path = path.parent
    return new


def records(folder: Path) -> dict[Path, bytes]:
    """Hydra's records in `folder` (a run's, or a sweep's and its jobs'), with their contents."""
    if not folder.is_dir():
        return {}
    return {p: p.read_bytes() for pattern in RECORDS for p in folder.glob(pattern) if p.is_file()}


def before(folder: Path, new: list[Path]) -> Before:
    """`folder` before a launch writes it; `new`: the folders made for it (new_dirs, taken before
    they were made)."""
    return Before(folder, new, records(folder))


@contextmanager
def held(folder: Path, lock: bool) -> Iterator[None]:
    """`folder`'s lock held by this process while the launch runs (when `lock`: trainer.devices
    workers share their launcher's instead); released also at exit, for a process that dies on
    its way out (lock.py)."""
    if lock:
        acquire(folder)
    try:
        yield
    finally:
        if lock:
            release(folder / NAME, os.getpid())


def undo(was: Before) -> None:
    """Undo what a launch refused as bad input wrote (.hydra/, launcher.log, multirun.yaml): its
    lock released, records that were there before as they were, the others gone, and the folders
    made for it if empty."""
    folder = was.folder
    release(folder / NAME, os.getpid())
    for path in set(records(folder)) - set(was.kept):
        path.unlink()
    for path, content in was.kept.items():
        path.write_bytes(content)
    for hydra in [*folder.glob(".hydra"), *folder.glob("*/.hydra")]:
        if not any(hydra.iterdir()):
            hydra.rmdir()
    for job in folder.iterdir() if folder.is_dir() else []:
        if job.is_dir() and not any(job.iterdir()):
            job.rmdir()
    for path in was.new:
        try:
            path.rmdir()
        except OSError:  # not empty: something else is there
            break

"""Checkpoint files that never lose work: atomic writes, a digest per file, a `latest` pointer.

A checkpoint is written to a temporary name, flushed and fsynced, given a SHA-256 sidecar, then
renamed into place; the `latest` pointer is replaced last, so a kill at any moment leaves the
previous checkpoint as `latest` and at worst a stray temporary file. Loading checks the digest and
uses `torch.load(weights_only=True)` (no code runs); a truncated or corrupt checkpoint is reported
and the next older one is tried. Only rank 0 calls these.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.training.faults import test_kill

FOLDER = "checkpoints"
LATEST = "latest"
NAME = re.compile(r"^step-(\d{9})\.pt$")


def folder(run_dir: Path) -> Path:
    return run_dir / FOLDER


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of optimizer step `step`; keep the newest `keep`. A write
    that fails (disk full) leaves no temporary file and the previous checkpoints as they were,
    and raises WriteFailed."""
    where = folder(run_dir)
    final = where / f"step-{step:09d}.pt"
    try:
        where.mkdir(exist_ok=True)
        for stale in where.glob("*.tmp"):  # left by a save that was killed
            stale.unlink()
        _save(where, final, step, state)
    except OSError as exc:
        from launcher.checkpoint.paths import WriteFailed

        for partial in where.glob("*.tmp"):
            partial.unlink(missing_ok=True)
        before = [p for p in checkpoints(run_dir) if p != final]
        kept = f"; the previous one, {before[0]}, is intact" if before else "; none saved before"
        raise WriteFailed("checkpoint", final, exc, kept) from None
    for old in checkpoints(run_dir)[keep:]:
        old.unlink()
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return final


def _save(where: Path, final: Path, step: int, state: dict[str, Any]) -> None:
    import torch

    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    test_kill(step, "written")
    _write_atomic(final.with_suffix(".sha256"), (_digest(tmp) + "\n").encode())
    os.replace(tmp, final)
    _fsync_dir(where)
    test_kill(step, "renamed")
    _write_atomic(where / LATEST, (final.name + "\n").encode())


def checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint files in `run_dir`, newest step first."""
    where = folder(run_dir)
    if not where.is_dir():
        return []
    found = [p for p in where.iterdir() if NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)), reverse=True)


def _candidates(run_dir: Path) -> list[Path]:
    """`latest` first (if it names a file), then every checkpoint, newest first."""
    found = checkpoints(run_dir)
    pointer = folder(run_dir) / LATEST
    try:
        named = folder(run_dir) / pointer.read_text().strip()
    except OSError:
        return found
    return [named] + [p for p in found if p != named]


def load(source: Path, warn: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint in run directory `source` (or the checkpoint file `source`) whose
    digest matches and which loads safely, or None."""
    import torch

    single = source.is_file()
    for path in [source] if single else _candidates(source):
        try:
            expected = path.with_suffix(".sha256").read_text().strip()
            if _digest(path) != expected:
                raise ValueError("its SHA-256 does not match the one written with it")
            with warnings.catch_warnings():  # torch's notes on pickle protocols: not ours
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "consumed_samples" not in state:
                raise ValueError("it is not a launcher checkpoint")
            return state, path
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, try an older one
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, pickle.UnpicklingError):
                why = "it holds more than tensors and plain containers, which is never unpickled"
            if single:  # a file named by resume=: there is no older one to try
                raise Unusable(f"{path} is not a usable checkpoint ({why})") from None
            warn(f"launcher: checkpoint {path} is unusable ({why}); trying an older one")
    return None


class Unusable(Exception):
    """The checkpoint file asked for cannot be used (resume=FILE)."""

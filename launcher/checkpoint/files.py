"""Checkpoint files that never lose work: atomic writes, a digest per file, a `latest` pointer.

A checkpoint is written to a temporary name, flushed and fsynced, given a SHA-256 sidecar, then
renamed into place; the `latest` pointer is replaced last, so a kill at any moment leaves the
previous checkpoint as `latest` and at worst a stray temporary file. Loading checks the digest and
uses `torch.load(weights_only=True)` (no code runs); a truncated or corrupt checkpoint is reported
and the next older one is tried. Only rank 0 calls `save`.

A sharded checkpoint (backend=fsdp) is a folder `step-N.dcp` that every rank wrote its shards into
through torch.distributed.checkpoint (under the temporary name `step-N.dcp.tmp`), beside the
`step-N.pt` of everything else. Each rank hashes its own files; `save` gets the folder and the
manifest (file: [bytes, SHA-256]), renames the folder into place before the `.pt` that lists it,
so `latest` never names a checkpoint whose shards are not all there; `load` checks every file of
the manifest against its size and digest (every rank reads the whole folder once, page-cached
per node).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

from launcher.checkpoint.paths import WriteFailed
from launcher.faults import test_kill
from launcher.types.state import CheckpointState

FOLDER = "checkpoints"
LATEST = "latest"
NAME = re.compile(r"^step-(\d{9})\.pt$")
PLAIN_NAME = re.compile(r"(?!\.\.?$)[\w.-]+")  # a file name inside a folder, not . or ..


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
    with open_regular(path) as f:
        return _digest_of(f)


def _digest_of(f: BinaryIO) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file (a symlink to one is fine); OSError for
    anything else, a FIFO or a device (/dev/zero) included, without blocking on it or reading it
    without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _small_text(path: Path, limit: int = 4096) -> str:
    """A short text file (a digest sidecar, the `latest` pointer): ValueError when it is longer
    than `limit` bytes or not UTF-8, OSError when it is not a regular file."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is longer than {limit} bytes")
    return data.decode().strip()


def shards_tmp(run_dir: Path, step: int) -> Path:
    """The folder every rank writes the shards of step `step` into (renamed by `save`)."""
    return folder(run_dir) / f"step-{step:09d}.dcp.tmp"


def shards_of(path: Path) -> Path:
    """The shard folder of checkpoint file `path` (it may have none)."""
    return path.with_suffix(".dcp")


def hash_files(paths: list[Path]) -> dict[str, list[int | str]]:
    """{name: [bytes, SHA-256]} of `paths` (each rank hashes the shards it wrote)."""
    return {p.name: [p.stat().st_size, _digest(p)] for p in paths}


def save(
    run_dir: Path,
    step: int,
    state: CheckpointState,
    keep: int,
    shards: dict[str, list[int | str]] | None = None,
) -> Path:
    """Write `state` as the checkpoint of optimizer step `step`; keep the newest `keep`. A write
    that fails (disk full) leaves no temporary file and the previous checkpoints as they were,
    and raises WriteFailed. `shards`: the manifest of the shard folder the ranks wrote
    (`shards_tmp`), recorded in the checkpoint and moved into place first."""
    where = folder(run_dir)
    final = where / f"step-{step:09d}.pt"
    partial_shards = shards_tmp(run_dir, step) if shards is not None else None
    try:
        where.mkdir(exist_ok=True)
        for stale in where.glob("*.tmp"):  # left by a save that was killed
            if stale != partial_shards:
                _remove(stale)
        for orphan in where.glob("*.dcp"):  # moved into place, killed before its .pt was
            if not orphan.with_suffix(".pt").exists():
                _remove(orphan)
        if partial_shards is not None and shards is not None:
            state = state.copy()  # the manifest goes into a copy, not the caller's state
            state["shards"] = shards
            _remove(shards_of(final))  # a folder of this step from an earlier, unlisted save
            os.replace(partial_shards, shards_of(final))
            _fsync_dir(where)
        _save(where, final, step, state)
    except OSError as exc:
        for partial in where.glob("*.tmp"):
            _remove(partial)
        if partial_shards is not None and not final.exists():
            _remove(shards_of(final))
        before = [p for p in checkpoints(run_dir) if p != final]
        kept = f"; the previous one, {before[0]}, is intact" if before else "; none saved before"
        raise WriteFailed("checkpoint", final, exc, kept) from None
    for old in checkpoints(run_dir)[keep:]:
        old.unlink()
        old.with_suffix(".sha256").unlink(missing_ok=True)
        _remove(shards_of(old))
    return final


def _remove(path: Path) -> None:
    """A file or a folder, if it is there."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _check_shards(path: Path, manifest: dict[str, list[int | str]]) -> None:
    """Raise ValueError unless the shard folder of `path` holds every file of the manifest with
    its size and digest, and its metadata builds nothing but checkpoint metadata pointing at
    those files (checkpoint/shards.py: no pickle of it runs code)."""
    from launcher.checkpoint.shards import METADATA, read_metadata  # heavy: torch

    where = shards_of(path)
    for name, (size, digest) in sorted(manifest.items()):
        file = where / name
        if not _regular(file):
            raise ValueError(f"its shard {file} is missing")
        if file.stat().st_size != size or _digest(file) != digest:
            raise ValueError(f"its shard {file} does not match the digest written with it")
    if METADATA not in manifest:
        raise ValueError(f"its shard folder's {METADATA} is not listed")
    read_metadata((where / METADATA).read_bytes(), manifest)


def torch_save(obj: Any, f: BinaryIO) -> None:
    """torch.save into the open file `f`. torch's zip writer turns a failed write (a full disk)
    into a RuntimeError; the OSError it hides is raised instead, for the one-line exit 5."""
    import torch

    try:
        torch.save(obj, f)
    except RuntimeError as exc:
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise


def _save(where: Path, final: Path, step: int, state: CheckpointState) -> None:
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        torch_save(state, f)
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
    found = [(int(m.group(1)), p) for p in where.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _candidates(run_dir: Path, warn: Callable[[str], None]) -> list[Path]:
    """`latest` first (if it names a checkpoint file), then every checkpoint, newest first."""
    found = checkpoints(run_dir)
    pointer = folder(run_dir) / LATEST
    try:
        name = _small_text(pointer)
    except FileNotFoundError:
        return found
    except (OSError, ValueError) as exc:
        warn(f"launcher: {pointer} is unreadable ({_why(exc)}); looking at every checkpoint")
        return found
    if not NAME.match(name):
        warn(f"launcher: {pointer} names {name!r}, not a checkpoint; looking at every checkpoint")
        return found
    named = folder(run_dir) / name
    return [named] + [p for p in found if p != named]


def _why(exc: BaseException) -> str:
    """An error in a few words: its first line, or its type."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load(
    source: Path, warn: Callable[[str], None], check: Callable[[object], None] | None = None
) -> tuple[CheckpointState, Path] | None:
    """The newest checkpoint in run directory `source` (or the checkpoint file `source`) whose
    digest matches, which loads safely and which `check` (raising ValueError) accepts, or None.
    Files that are not regular files (a FIFO, a link to a device) are passed over unread."""
    import torch

    single = _regular(source)
    for path in [source] if single else _candidates(source, warn):
        try:
            expected = _small_text(path.with_suffix(".sha256"))
            with open_regular(path) as f:  # digest and load read the same file
                if _digest_of(f) != expected:
                    raise ValueError("its SHA-256 does not match the one written with it")
                f.seek(0)
                with warnings.catch_warnings():  # torch's notes on pickle protocols: not ours
                    warnings.simplefilter("ignore")
                    state = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "consumed_samples" not in state:
                raise ValueError("it is not a launcher checkpoint")
            if check is not None:
                check(state)
            if "shards" in state:
                _check_shards(path, state["shards"])
            return cast(CheckpointState, state), path  # its shape: `check` (resume.check_state)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, try an older one
            why = _why(exc)
            if isinstance(exc, pickle.UnpicklingError):
                why = "it holds more than tensors and plain containers, which is never unpickled"
            if single:  # a file named by resume=: there is no older one to try
                raise Unusable(f"{path} is not a usable checkpoint ({why})") from None
            warn(f"launcher: checkpoint {path} is unusable ({why}); trying an older one")
    return None


class Unusable(Exception):
    """The checkpoint file asked for cannot be used (resume=FILE)."""

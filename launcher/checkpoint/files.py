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


def shards_tmp(run_dir: Path, step: int) -> Path:
    """The folder every rank writes the shards of step `step` into (renamed by `save`)."""
    return folder(run_dir) / f"step-{step:09d}.dcp.tmp"


def shards_of(path: Path) -> Path:
    """The shard folder of checkpoint file `path` (it may have none)."""
    return path.with_suffix(".dcp")


def hash_files(paths: list[Path]) -> dict[str, list[Any]]:
    """{name: [bytes, SHA-256]} of `paths` (each rank hashes the shards it wrote)."""
    return {p.name: [p.stat().st_size, _digest(p)] for p in paths}


def save(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    shards: dict[str, list[Any]] | None = None,
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
        if partial_shards is not None:
            state = state | {"shards": shards}
            _remove(shards_of(final))  # a folder of this step from an earlier, unlisted save
            os.replace(partial_shards, shards_of(final))
            _fsync_dir(where)
        _save(where, final, step, state)
    except OSError as exc:
        from launcher.checkpoint.paths import WriteFailed

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


def _check_shards(path: Path, manifest: dict[str, list[Any]]) -> None:
    """Raise ValueError unless the shard folder of `path` holds every file of the manifest with
    its size and digest."""
    where = shards_of(path)
    for name, (size, digest) in sorted(manifest.items()):
        file = where / name
        if not file.is_file():
            raise ValueError(f"its shard {file} is missing")
        if file.stat().st_size != size or _digest(file) != digest:
            raise ValueError(f"its shard {file} does not match the digest written with it")


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
            if "shards" in state:
                _check_shards(path, state["shards"])
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

"""Plain text as byte tokens: one file, or a folder's files in sorted order, as one byte stream.

The vocabulary is the 256 byte values (UTF-8 text needs no tokenizer download). The last
`eval_fraction` of the stream is the evaluation split; each split is cut into sequences of
seq_len + 1 bytes that overlap by one (inputs = the first seq_len, targets = the last seq_len).
A single file is memory-mapped as it is; a folder's files are concatenated once into a cached
stream (named by a digest of the paths, sizes and modification times, written atomically), which
every rank then memory-maps: a corpus costs page cache, not memory per rank.
With `path` null the corpus is the Python standard library's own sources (site-packages left out).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launcher.config.components import TextConfig
from launcher.data import DataSpec, Splits
from launcher.errors import ConfigError

VOCAB = 256
THIRD_PARTY = frozenset({"site-packages", "dist-packages"})  # not the standard library's own


@dataclass(frozen=True)
class Corpus:
    root: Path
    files: tuple[Path, ...]
    sizes: tuple[int, ...]
    mtimes: tuple[int, ...]  # st_mtime_ns: with the sizes, what names the cached stream

    @property
    def bytes(self) -> int:
        return sum(self.sizes)

    def describe(self) -> str:
        where = self.root if len(self.files) > 1 else self.files[0]
        return f"{self.bytes:,} bytes in {len(self.files):,} file(s) of {where}"


def corpus(cfg: TextConfig) -> Corpus:
    """The files the stream is made of, in order (stat only: nothing is read)."""
    skip: frozenset[str] = frozenset()
    if cfg.path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        pattern = "**/*.py" if cfg.glob == "auto" else cfg.glob
        skip = THIRD_PARTY
    else:
        root = Path(cfg.path).expanduser()
        pattern = "**/*.txt" if cfg.glob == "auto" else cfg.glob
        if root.is_file():
            stat = root.stat()
            return Corpus(root.parent, (root,), (stat.st_size,), (stat.st_mtime_ns,))
        if not root.is_dir():
            raise ConfigError(f"data.path={cfg.path!r}: no such file or folder")
    files = sorted(
        p
        for p in root.glob(pattern)
        if p.is_file() and not skip.intersection(p.relative_to(root).parts)
    )
    if not files:
        raise ConfigError(
            f"data.glob={cfg.glob!r}: no file matches {pattern!r} under {root}; set data.glob "
            "(e.g. '**/*.md') or point data.path at a file"
        )
    stats = [p.stat() for p in files]
    return Corpus(
        root, tuple(files), tuple(s.st_size for s in stats), tuple(s.st_mtime_ns for s in stats)
    )


def split_sizes(cfg: TextConfig, total: int) -> tuple[int, int]:
    """(train bytes, eval bytes) of a stream of `total` bytes; both must hold one sequence."""
    n_eval = int(total * cfg.eval_fraction)
    n_train = total - n_eval
    need = cfg.seq_len + 1
    if min(n_train, n_eval) < need:
        raise ConfigError(
            f"data.seq_len={cfg.seq_len}: the corpus ({total:,} bytes) split at "
            f"data.eval_fraction={cfg.eval_fraction} gives {n_train:,} training and {n_eval:,} "
            f"evaluation bytes; each needs at least seq_len + 1 = {need}"
        )
    return n_train, n_eval


def sequences(length: int, seq_len: int) -> int:
    """Samples in a split of `length` bytes: windows of seq_len + 1 starting every seq_len."""
    return (length - 1) // seq_len


def spec(cfg: TextConfig) -> DataSpec:
    return DataSpec((cfg.seq_len,), VOCAB, tokens=True)


def epoch_samples(cfg: TextConfig) -> tuple[int, str]:
    c = corpus(cfg)
    n_train, _ = split_sizes(cfg, c.bytes)
    samples = sequences(n_train, cfg.seq_len)
    return samples, (
        f" ({n_train:,} training bytes of {c.describe()}, in sequences of {cfg.seq_len} tokens)"
    )


def _digest(c: Corpus) -> str:
    h = hashlib.sha256(str(c.root).encode())
    for path, size, mtime in zip(c.files, c.sizes, c.mtimes, strict=True):
        h.update(f"\0{path.relative_to(c.root)}\0{size}\0{mtime}".encode())
    return h.hexdigest()[:20]


def stream(cfg: TextConfig, c: Corpus) -> np.ndarray:
    """The corpus as one read-only uint8 array (memory-mapped)."""
    if len(c.files) == 1:
        return np.memmap(c.files[0], dtype=np.uint8, mode="r")
    cache = Path(os.path.expanduser(cfg.cache_dir))
    path = cache / f"text-{_digest(c)}.bin"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".tmp", delete=False) as tmp:
            for f in c.files:
                tmp.write(f.read_bytes())
        if os.path.getsize(tmp.name) != c.bytes:  # a file changed while it was read
            os.unlink(tmp.name)
            raise ConfigError(f"data.path={cfg.path!r}: files changed while being read; rerun")
        os.replace(tmp.name, path)
    return np.memmap(path, dtype=np.uint8, mode="r")


class TokenBlocks(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Sample i = bytes [i*T, i*T + T + 1) of `data`: (inputs [:T], targets [1:]) as int64."""

    batched = True  # the loader passes whole index arrays

    def __init__(self, data: np.ndarray, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len
        self.offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return sequences(len(self.data), self.seq_len)

    def __getitem__(self, index: np.ndarray | int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(index)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sequence index out of range [0, {len(self)})")
        positions = idx[..., None] * self.seq_len + self.offsets
        rows = torch.from_numpy(self.data[positions].astype(np.int64))
        return rows[..., :-1], rows[..., 1:]


def build(cfg: TextConfig) -> Splits:
    c = corpus(cfg)
    n_train, _ = split_sizes(cfg, c.bytes)  # refuses a corpus too small (or empty) to split
    data = stream(cfg, c)
    return Splits(
        train=TokenBlocks(data[:n_train], cfg.seq_len),
        eval=TokenBlocks(data[n_train:], cfg.seq_len),
        spec=spec(cfg),
    )

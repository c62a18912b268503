"""Memory the model needs: fixed bytes + bytes per sample, measured, cached or estimated.

A probe step is one real forward, loss, backward and optimizer step of a fresh copy of the model,
with the run's precision, on the run's device (launcher/memory/probe.py). On CUDA the allocator's
peak is read; on CPU a dispatch mode counts tensor storage bytes, so the whole path runs here. Two
small probe sizes fit the lines; the chosen size is then verified with a third step. `plan_only`
estimates the same profile with fake tensors (no memory, no device).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from launcher.config.execution import MemoryConfig

GB = 1024**3  # the config's *_gb values are GiB, as nvidia-smi and torch report them
PROBE_SIZES = (2, 8)
CEILING_SLACK = 1.1  # an out-of-memory error at budget B still counts for budgets up to 1.1 B
# an allocator's own words in a RuntimeError that is not torch.OutOfMemoryError: the CPU
# allocator's ("DefaultCPUAllocator: can't allocate memory"), CUDA's outside the caching allocator
# ("CUDA error: out of memory") and any device's "... out of memory" (HIP, MPS)
OOM_TEXTS = ("out of memory", "can't allocate memory")


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is the device running out of memory, however the limit is imposed: torch's
    OutOfMemoryError (CUDA's caching allocator, a per-process memory fraction, the fault hook) or
    a RuntimeError in an allocator's own words (OOM_TEXTS). The probe tells it from an error of
    the model on the data (a shape mismatch: one ConfigError line) by this."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in OOM_TEXTS)


@dataclass(frozen=True)
class MemoryProfile:
    """Peak bytes of a training step as a function of the micro-batch n.

    Live memory after op t of a step is c_t + a_t x n (weights, optimizer state and workspaces do
    not grow with n; activations and gradients of activations do). The peak is the largest of these
    lines, so the profile keeps the lines that can be largest (`lines`, as (bytes, bytes/sample))
    plus `overhead_bytes` the tensor count cannot see (allocator rounding, workspaces, DDP buckets).
    """

    lines: tuple[tuple[int, int], ...]
    overhead_bytes: int
    points: tuple[tuple[int, int], ...]  # (micro, measured peak) of the probe steps
    source: str  # measured | cached | estimated
    # (budget bytes, micro-batch) of out-of-memory errors in training: evidence about one size
    # under one budget (fragmentation, other tenants), kept apart from the measured lines
    ceilings: tuple[tuple[int, int], ...] = ()

    def peak(self, micro: int) -> int:
        return self.overhead_bytes + max(c + a * micro for c, a in self.lines)

    def line_cap(self, budget_bytes: int) -> int:
        """Largest micro-batch whose predicted peak fits the budget (0 if none)."""
        room = budget_bytes - self.overhead_bytes
        fits = [(room - c) // a if a else (1 << 40 if c <= room else -1) for c, a in self.lines]
        return max(min(fits), 0)

    def ceiling(self, budget_bytes: int) -> int | None:
        """Below the smallest micro-batch that ran out of memory under a budget at least this one
        less CEILING_SLACK (a run with no more room: free memory moves a little between runs);
        None without one. Never below 1: an out-of-memory error lowers a cap, it does not refuse
        a run the measured lines allow."""
        failed = [m for budget, m in self.ceilings if budget * CEILING_SLACK >= budget_bytes]
        return max(min(failed) - 1, 1) if failed else None

    def max_micro(self, budget_bytes: int) -> int:
        """The cap: the measured lines' (0 if one sample does not fit), under any ceiling."""
        cap, ceiling = self.line_cap(budget_bytes), self.ceiling(budget_bytes)
        return min(cap, ceiling) if cap >= 1 and ceiling is not None else cap

    @property
    def per_sample_bytes(self) -> int:
        return max(a for _, a in self.lines)

    def describe(self) -> str:
        return (
            f"{human_bytes(self.peak(1))} at 1 sample, up to {human_bytes(self.per_sample_bytes)}"
            f" more per sample ({self.source})"
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def upper_lines(lines: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Drop every line that another one beats at all n >= 0 (more or equal bytes and slope)."""
    kept: list[tuple[int, int]] = []
    for c, a in sorted(set(lines), key=lambda ca: (-ca[1], -ca[0])):
        if not kept or c > kept[-1][0]:
            kept.append((c, a))
    return tuple(kept)


Trace = tuple[list[int], list[str]]  # live bytes after each op, and the op


def fit_traces(n1: int, trace1: Trace, n2: int, trace2: Trace, source: str) -> MemoryProfile:
    """Lines c_t + a_t n through the live bytes of the same ops at two batch sizes.

    The op sequences are aligned by name (a first call in a process runs a few extra set-up ops);
    an op seen at one size only contributes its bytes as a constant line. With no op in common
    the line through the two peaks is all there is.
    """
    if n1 == n2:
        raise ValueError(f"need two different micro-batch sizes, got {n1} twice")
    (live1, ops1), (live2, ops2) = trace1, trace2
    lines = []
    matched1, matched2 = set(), set()
    matcher = difflib.SequenceMatcher(None, ops1, ops2, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            i, j = block.a + k, block.b + k
            lines.append(_line(n1, live1[i], n2, live2[j]))
            matched1.add(i)
            matched2.add(j)
    lines += [(live1[i], 0) for i in range(len(live1)) if i not in matched1]
    lines += [(live2[j], 0) for j in range(len(live2)) if j not in matched2]
    if not matched1:
        lines.append(_line(n1, max(live1), n2, max(live2)))
    points = ((n1, max(live1)), (n2, max(live2)))
    return MemoryProfile(upper_lines(lines), 0, points, source)


def _line(n1: int, y1: int, n2: int, y2: int) -> tuple[int, int]:
    """(bytes, bytes/sample) through two points; slope >= 0 and never below either point."""
    slope = max(math.ceil((y2 - y1) / (n2 - n1)), 0)
    return max(y1 - slope * n1, y2 - slope * n2), slope


def budget_bytes(cfg: MemoryConfig, device_free_bytes: int) -> tuple[int, str]:
    """(bytes a step may use, how that was decided) from the device's free memory and the config."""
    usable = int(cfg.fraction * device_free_bytes)
    why = f"{cfg.fraction:g} x {human_bytes(device_free_bytes)} free"
    if cfg.budget_gb != "auto" and cfg.budget_gb * GB < usable:
        usable, why = int(cfg.budget_gb * GB), f"memory.budget_gb={cfg.budget_gb:g}"
    budget = usable - int(cfg.margin_gb * GB)
    return budget, f"{human_bytes(budget)} = {why} - margin {cfg.margin_gb:g} GiB"


def free_bytes(device: str, local_processes: int) -> int:
    """Free memory this process may count on: the GPU's, or its share of available RAM."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // max(local_processes, 1)


# ------------------------------------------------------------------------------- measuring
class StorageMeter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Live and peak bytes of the tensor storages created while it is active (CPU or fake).

    Every op's outputs pass through `__torch_dispatch__`; a storage is counted once when first seen
    and released when Python frees it. Storage resizes in place are not seen (no op in a plain
    training step does that).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live = 0
        self.trace: list[int] = []  # live bytes after each op
        self.ops: list[str] = []  # which op
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        weakref.finalize(storage, self._release, nbytes)
        self.live += nbytes

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        self.trace.append(self.live)
        self.ops.append(str(func))
        return out

    def peak(self) -> int:
        return max(self.trace, default=0)


class CudaMeter:
    """Peak bytes the CUDA caching allocator handed out while active, above what was live."""

    def __enter__(self) -> CudaMeter:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


# ------------------------------------------------------------------------------------ cache
def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _as_json(parts: dict[str, Any]) -> Any:
    """The key as it reads back from the cache file."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def load_cached(cache_dir: str, key_parts: dict[str, Any]) -> tuple[MemoryProfile | None, str]:
    """(profile, note): None when missing, stale or corrupt (never trusted, never fatal)."""
    path = Path(os.path.expanduser(cache_dir)) / f"{cache_key(key_parts)}.json"
    if not path.exists():
        return None, "no cache entry"
    try:
        data = json.loads(path.read_text())
        if data["key"] != _as_json(key_parts):
            return None, f"stale cache entry {path} ignored"
        lines = tuple((int(c), int(a)) for c, a in data["lines"])
        points = tuple((int(n), int(p)) for n, p in data["points"])
        overhead = int(data["overhead_bytes"])
        ceilings = tuple((int(b), int(m)) for b, m in data.get("ceilings", ()))
        if not lines or min(min(c, a) for c, a in lines) < 0 or overhead < 0 or len(points) < 2:
            raise ValueError("negative or missing values")
        if any(b < 1 or m < 2 for b, m in ceilings):
            raise ValueError("a ceiling below 2 samples or without a budget")
        profile = MemoryProfile(lines, overhead, points, "cached", ceilings)
        return profile, f"cache entry {path}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"corrupt cache entry {path} ignored ({type(exc).__name__})"


def save_cached(cache_dir: str, key_parts: dict[str, Any], profile: MemoryProfile) -> Path:
    """Write atomically (concurrent ranks may write the same entry)."""
    folder = Path(os.path.expanduser(cache_dir))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cache_key(key_parts)}.json"
    data = asdict(profile) | {"key": _as_json(key_parts)}
    data.pop("source")
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as tmp:
        json.dump(data, tmp)
    os.replace(tmp.name, path)
    return path

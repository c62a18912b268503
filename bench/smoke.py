"""Every benchmark in its --smoke mode: a bench that breaks fails CI instead of rotting (issue 33).

Runs each bench/*.py but this one as `python bench/NAME.py --smoke`, one at a time, each in its own
process with this interpreter, from a temporary working folder, with one compute thread per
process (as the test suite's processes: two threads on a busy 2-core machine made some benches 3-4x
slower). Prints one line per script: its name, seconds, ok or FAILED (and what its smoke mode
skipped, from its `smoke: ...` line); a failure's last output lines follow the table. Exits 1 if
any script failed, wrote into the repository (`git status` before and after), ran past
--timeout, or does not declare a `--smoke` argument (then it is not run: a new bench without a
smoke mode fails here).

    python bench/smoke.py [NAME ...] [--timeout 600]      # CI: .venv/bin/python bench/smoke.py

Smoke mode checks that a bench runs, end to end, at the smallest sizes: not its speed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ONE_THREAD = {  # tests/conftest.py's ONE_THREAD
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
SMOKE_ARGUMENT = re.compile(r"add_argument\(\s*[\"']--smoke[\"']")
TAIL_LINES = 40


def scripts() -> list[Path]:
    """The benchmarks: every bench/*.py but this runner."""
    return sorted(p for p in BENCH.glob("*.py") if p.name != Path(__file__).name)


def declares_smoke(script: Path) -> bool:
    """Whether the script's argument parser has a --smoke argument (read, not run)."""
    return SMOKE_ARGUMENT.search(script.read_text()) is not None


def repo_state() -> set[str] | None:
    """`git status --porcelain` lines of the repository (None where git cannot tell)."""
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


def run(script: Path, timeout: float, work: Path) -> tuple[str, float, str, str]:
    """(verdict, seconds, note, output) of `python SCRIPT --smoke`."""
    if not declares_smoke(script):
        return "FAILED (no --smoke argument)", 0.0, "", ""
    before = repo_state()
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--smoke"],
            cwd=work,
            env={**os.environ, **ONE_THREAD},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
        )
        code, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        code, output = None, out.decode(errors="replace") if isinstance(out, bytes) else out
    seconds = time.perf_counter() - start
    notes = [line.strip() for line in output.splitlines() if line.startswith("smoke:")]
    after = repo_state()
    wrote = sorted(after - before) if before is not None and after is not None else []
    if code is None:
        verdict = f"FAILED (ran past --timeout {timeout:g} s)"
    elif code != 0:
        verdict = f"FAILED (exit {code})"
    elif wrote:
        verdict = f"FAILED (wrote into the repository: {', '.join(wrote)})"
    else:
        verdict = "ok"
    return verdict, seconds, "; ".join(notes), output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only these benchmarks (e.g. overhead quality)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per script")
    args = parser.parse_args()
    chosen = scripts()
    if args.names:
        known = {p.stem: p for p in chosen}
        unknown = [n for n in args.names if n.removesuffix(".py") not in known]
        if unknown:
            parser.error(f"no bench/NAME.py for {unknown}; the benchmarks: {sorted(known)}")
        chosen = [known[n.removesuffix(".py")] for n in args.names]
    failed: list[tuple[str, str]] = []
    total = time.perf_counter()
    print(f"bench smoke: {len(chosen)} scripts, {sys.executable}", flush=True)
    for script in chosen:
        with tempfile.TemporaryDirectory(prefix=f"bench-smoke-{script.stem}-") as work:
            verdict, seconds, note, output = run(script, args.timeout, Path(work))
        print(
            f"{script.name:<20} {seconds:6.1f} s  {verdict}" + (f"  ({note})" if note else ""),
            flush=True,
        )
        if verdict != "ok":
            failed.append((script.name, output))
    print(
        f"bench smoke: {len(chosen) - len(failed)} ok, {len(failed)} failed, "
        f"{time.perf_counter() - total:.0f} s; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for name, output in failed:
        if not output.strip():
            continue
        tail = "\n".join(output.splitlines()[-TAIL_LINES:])
        print(f"\n--- {name}: the last {TAIL_LINES} lines of its output ---\n{tail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

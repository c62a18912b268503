"""Start-up: wall time of `python -m launcher plan_only=true` against `python -c "import torch"`.

plan_only does everything a run does before its first step except building the data and the
model on the device: compose the Hydra config, validate it, resolve the topology, estimate the
memory with fake tensors, plan, write config.yaml and plan.json, print the plan. Importing torch
is the floor any PyTorch tool pays. Three commands alternate, each in a fresh process with a
fresh run directory: `import torch`; plan_only with an empty memory cache (the model is traced
with fake tensors, which imports torch._dynamo); plan_only with the estimate cached (every later
plan of the same model: another global batch, cluster or schedule). The ratios of the medians
are the result (issue 9 target: <= 1.3; issue 33: cached <= 1.15). `--other DIR` adds both
plan_only commands run from another checkout of the launcher (DIR first on PYTHONPATH: a git
worktree of an older commit), alternating with this one's in the same minutes.

    python bench/startup.py [--repeats 9] [--clock wall|cpu] [--other DIR] [-- LAUNCHER ARGS ...]
    python bench/startup.py --smoke   # seconds: one repeat, no warm-up runs
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK = "wall"


def wall(cmd: list[str], cwd: str, env: dict[str, str] | None = None) -> float:
    """Seconds `cmd` took: wall clock, or with --clock cpu its CPU time (user + system), which
    other tenants of a VM disturb less."""
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if CLOCK == "cpu":
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--other", help="another checkout's root, measured alternating")
    parser.add_argument("--smoke", action="store_true", help="one repeat, no warm-up")
    parser.add_argument("args", nargs="*", help="more launcher arguments (after --)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    global CLOCK
    CLOCK = args.clock
    floor = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {"import torch": [], "plan_only, cold": [], "plan_only": []}
    sides: dict[str, dict[str, str] | None] = {"": None}  # "": this checkout, in its own env
    if args.other:
        sides["other"] = {**os.environ, "PYTHONPATH": str(Path(args.other).resolve())}
        times |= {"other: plan_only, cold": [], "other: plan_only": []}
    with tempfile.TemporaryDirectory() as tmp:
        for side, env in sides.items():  # which code each side imports, where the runs start
            found = [sys.executable, "-c", "import launcher; print(launcher.__file__)"]
            where = subprocess.run(found, cwd=tmp, env=env, check=True, capture_output=True)
            print(f"{side or 'this'}: {where.stdout.decode().strip()}")

        def launcher(run: str, cache: str) -> list[str]:
            run_dir, cache_dir = f"run_dir={run}", f"memory.cache_dir={cache}"
            return [
                sys.executable,
                "-m",
                "launcher",
                "plan_only=true",
                run_dir,
                cache_dir,
                *args.args,
            ]

        if not args.smoke:  # (smoke: each cached run reads its cold run's cache)
            wall(floor, tmp)  # warm the file cache for all three and fill the shared memory cache
            for side, env in sides.items():
                wall(launcher(f"{side}warm", f"{side}cache"), tmp, env)
        for i in range(args.repeats):
            times["import torch"].append(wall(floor, tmp))
            for side, env in sides.items():
                label = f"{side}: " if side else ""
                cold = launcher(f"{side}cold{i}", f"{side}cold-cache{i}")
                times[f"{label}plan_only, cold"].append(wall(cold, tmp, env))
                cache = f"{side}cold-cache{i}" if args.smoke else f"{side}cache"
                cached = launcher(f"{side}run{i}", cache)
                times[f"{label}plan_only"].append(wall(cached, tmp, env))
    for name, runs in times.items():
        print(
            f"{name:>23}: median {statistics.median(runs):.3f} s (runs: "
            + ", ".join(f"{t:.2f}" for t in runs)
            + ")"
        )
    floor_s = statistics.median(times["import torch"])
    for name in [n for n in times if n != "import torch"]:
        ratio = statistics.median(times[name]) / floor_s
        print(f"ratio {name} / import torch = {ratio:.3f} (medians, {CLOCK} clock)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
